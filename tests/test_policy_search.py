"""`suggest --strategy search` (policy_search): space, budget, study, pruning; synthetic objectives."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from helpers import tiny_bert, tiny_gpt2, tiny_llama
from optuna.trial import TrialState, create_trial

from lightning_peft import LayerPolicy
from lightning_peft.adapters.base import ADAPTERS
from lightning_peft.experiments.policy_search import (
    SPECIAL,
    Baseline,
    Infeasible,
    SearchError,
    SearchSettings,
    TrialPruning,
    allocate,
    build_space,
    check_budget,
    enqueue_baselines,
    make_pruner,
    open_study,
    optimize,
    pick,
    require_optuna,
    trial_policy,
    uniform_baselines,
)

WORKER = Path(__file__).parent / "scripts" / "search_worker.py"
SIZED = [name for name, cls in ADAPTERS.items() if cls.hparams_for_rank(1) is not None]


@pytest.mark.parametrize("method", SIZED)
def test_rank_for_budget_is_the_largest_rank_within_the_budget(method):
    cls = ADAPTERS[method]
    shapes = [(32, 32), (32, 64), (64, 32), (32, 32)]
    for budget in (300, 1000, 5000):
        sized = cls.rank_for_budget(shapes, budget)
        if sized is None:
            assert sum(cls.count_parameters(i, o, **cls.hparams_for_rank(1)) for i, o in shapes) > budget
            continue
        hparams, params = sized
        assert params == sum(cls.count_parameters(i, o, **hparams) for i, o in shapes) <= budget
        bigger = cls.hparams_for_rank(hparams["r"] + 1)
        over = sum(cls.count_parameters(i, o, **bigger) for i, o in shapes)
        assert over > budget or any(cls.count_parameters(i, o, **bigger) > i * o for i, o in shapes)


@pytest.mark.parametrize(
    ("build", "methods"),
    [*[(tiny_llama, [m, "none"]) for m in [*SIZED, "full"]], (tiny_bert, None), (tiny_gpt2, None)],
)
def test_every_sampled_policy_resolves_within_the_budget(build, methods):
    """Random points of the space (one method per group, or any): every feasible one is a policy within budget."""
    model = build(num_hidden_layers=4) if build is not tiny_gpt2 else build(n_layer=4)
    budget = 20_000
    space = build_space(model, SearchSettings(methods=methods), budget)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    counts = []

    def objective(trial):
        policy, _ = trial_policy(trial, space, model)  # raises Infeasible for points no policy realises
        counts.append(check_budget(policy, model, budget))
        plan = LayerPolicy.from_dict(policy).resolve(model)
        assert {r.method for r in plan.rows} <= set(methods or plan.params_by_method())
        return counts[-1]

    study.optimize(objective, n_trials=10, catch=(Infeasible,))  # anything else fails the test
    assert counts, f"no feasible policy of {methods} at {budget}"
    assert all(0 < n <= budget for n in counts)


def test_groups_split_module_type_and_depth_and_name_exactly_their_modules():
    model = tiny_bert(num_hidden_layers=4)
    space = build_space(model, SearchSettings(), 50_000)
    assert [g.name for g in space.groups] == ["attention-outer", "attention-inner", "mlp-outer", "mlp-inner"]
    by_group = {g.name: {m.name for m in g.modules} for g in space.groups}
    assert "encoder.layer.0.attention.output.dense" in by_group["attention-outer"]
    assert "encoder.layer.0.output.dense" in by_group["mlp-outer"]  # a suffix of the attention one
    assert {m.name.split(".")[2] for m in space.groups[1].modules} == {"1", "2"}
    for g in space.groups:  # the rule the group becomes matches exactly its modules
        policy = {"rules": [{"method": "lora", "modules": [g.pattern], "depth": g.depth, "hparams": {"r": 1}}]}
        assert {r.name for r in LayerPolicy.from_dict(policy).resolve(model).rows} == by_group[g.name]


def test_allocate_fills_the_budget_by_weight():
    model = tiny_llama()
    space = build_space(model, SearchSettings(outer_blocks=0), 10_000)
    methods = {g.name: "lora" for g in space.groups}
    even = allocate(space, methods, {g.name: 1.0 for g in space.groups})
    skewed = allocate(space, methods, {space.groups[0].name: 1.0, space.groups[1].name: 0.3})
    assert sum(c.params for c in even) <= 10_000 and sum(c.params for c in skewed) <= 10_000
    assert skewed[0].hparams["r"] > even[0].hparams["r"] > skewed[1].hparams["r"]
    # what the floors leave goes to the heaviest group: less than one rank step of any group is left
    step = min(c.params // c.hparams["r"] for c in even)
    assert 10_000 - sum(c.params for c in even) < step


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'search.db'}"


def test_uniform_baselines_are_the_first_trials_and_run_once(tmp_path):
    model = tiny_llama()
    settings = SearchSettings(metric="trainable", mode="max", heartbeat_s=5)
    space = build_space(model, settings, 8000)
    baselines = uniform_baselines(space)
    assert [b.label.split("-")[1] for b in baselines] == [m for m in SIZED if m in space.options["attention-outer"]]
    study = open_study(_sqlite(tmp_path), settings, space.fingerprint())
    assert enqueue_baselines(study, baselines) == [b.label for b in baselines]
    assert enqueue_baselines(study, baselines) == []  # a resumed search enqueues nothing twice

    def objective(trial):
        policy, label = trial_policy(trial, space, model)
        return check_budget(policy, model, 8000)

    optimize(study, objective, n_trials=len(baselines) + 2)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.user_attrs["label"] for t in trials[: len(baselines)]] == [b.label for b in baselines]
    for t, b in zip(trials, baselines, strict=False):
        plan = LayerPolicy.from_dict(t.user_attrs["policy"]).resolve(model)
        assert {r.method for r in plan.rows} == {b.label.split("-")[1]}
        assert len({tuple(sorted(r.hparams.items())) for r in plan.rows}) == 1  # one rank everywhere: uniform
        assert t.values[0] == b.trainable <= 8000
    assert [t.user_attrs["label"] for t in trials[len(baselines) :]] == ["search", "search"]


def test_a_changed_space_is_refused_by_name(tmp_path):
    model = tiny_llama()
    settings = SearchSettings()
    open_study(_sqlite(tmp_path), settings, build_space(model, settings, 8000).fingerprint())
    with pytest.raises(SearchError, match="searched another space"):
        open_study(_sqlite(tmp_path), settings, build_space(model, settings, 9000).fingerprint())
    with pytest.raises(SearchError, match=r"optimises \['minimize'\], not \['minimize', 'maximize'\]"):
        open_study(_sqlite(tmp_path), SearchSettings(forget_metric="forget/x"))


def _worker(url: str, n: int, log: Path, kill_at: int | None = None) -> subprocess.Popen:
    args = [sys.executable, str(WORKER), url, str(n), str(log), *([str(kill_at)] if kill_at is not None else [])]
    env = {**__import__("os").environ, "PYTHONPATH": f"{Path(__file__).parents[1]}"}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _synthetic_study(tmp_path: Path) -> optuna.Study:
    settings = SearchSettings(metric="x", heartbeat_s=1, sampler="random", pruner="none")
    study = open_study(_sqlite(tmp_path), settings)
    enqueue_baselines(study, [Baseline(f"uniform-{x}", {"x": x}, {}, 0) for x in (0.0, 1.0)])
    return study


def _log(path: Path) -> list[tuple[int, float, int]]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    return [(int(n), float(x), int(pid)) for n, x, pid in rows]


@pytest.mark.slow  # two Python processes importing torch and Lightning
def test_a_killed_search_resumes_without_rerunning_finished_trials(tmp_path):
    study = _synthetic_study(tmp_path)
    log = tmp_path / "evaluated.csv"
    first = _worker(_sqlite(tmp_path), 6, log, kill_at=3)  # SIGKILL when trial 3 starts: trial 3 left RUNNING
    first.wait(timeout=300)
    assert first.returncode == -9
    assert [n for n, _, _ in _log(log)] == [0, 1, 2]
    time.sleep(2.5)  # past the heartbeat's grace period: the next worker fails trial 3 and retries it
    second = _worker(_sqlite(tmp_path), 6, log)
    assert second.wait(timeout=300) == 0, second.stderr.read()
    evaluated = _log(log)
    assert len({n for n, _, _ in evaluated}) == len(evaluated)  # no trial evaluated twice
    assert len({x for _, x, _ in evaluated}) == len(evaluated) == 6  # nor any point: trials 0-2 were not re-run
    trials = study.get_trials()
    assert trials[3].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 3]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6
    assert {t.params["x"] for t in trials[:2]} == {0.0, 1.0}


@pytest.mark.slow  # two Python processes importing torch and Lightning
def test_two_workers_share_one_storage(tmp_path):
    study = _synthetic_study(tmp_path)
    log = tmp_path / "evaluated.csv"
    workers = [_worker(_sqlite(tmp_path), 10, log) for _ in range(2)]
    for w in workers:
        assert w.wait(timeout=300) == 0, w.stderr.read()
    evaluated = _log(log)
    assert len({n for n, _, _ in evaluated}) == len(evaluated)  # every trial ran in exactly one worker
    assert {pid for _, _, pid in evaluated} == {w.pid for w in workers}  # both worked on the study
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert 10 <= len(complete) <= 11  # the last trial each worker started may both finish
    assert sorted(t.params["x"] for t in complete if t.user_attrs.get("label")) == [0.0, 1.0]  # baselines once


def test_successive_halving_prunes_a_trial_that_learns_slower():
    study = optuna.create_study(direction="maximize", pruner=make_pruner(SearchSettings(reduction_factor=2)))
    curves = {0: [0.2, 0.5, 0.8, 0.9], 1: [0.3, 0.6, 0.9, 0.95], 2: [0.05, 0.1, 0.15, 0.2]}
    reached = {}

    def objective(trial):
        for step, value in enumerate(curves[trial.number], 1):
            trial.report(value, step)
            reached[trial.number] = step
            if trial.should_prune():
                raise optuna.TrialPruned
        return curves[trial.number][-1]

    study.optimize(objective, n_trials=3)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert reached[2] < 4


def test_pruning_callback_stops_a_real_fit(tmp_path):
    """`TrialPruning` inside a Lightning fit: an always-prune pruner stops the run at its first validation."""
    import yaml
    from test_search_suggest_cli import TINY

    from lightning_peft.experiments.compare import Variant, run_variant

    config = dict(TINY, trainer={**TINY["trainer"], "max_steps": 6, "val_check_interval": 2,
                                 "check_val_every_n_epoch": None})  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # any val_loss > 0 prunes
    trial = study.ask()
    pruning = TrialPruning(trial, "val_loss", "last")
    record, curves, _ = run_variant(path, Variant("t", {}), tmp_path / "runs", 0, callbacks=[pruning])
    assert record.status == "ok"
    assert pruning.pruned_at == 2 and len(curves) == 1 and curves[0]["step"] == 2
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {2: pytest.approx(curves[0]["val_loss"])}
    assert len(pruning.values) == 1 and torch.isfinite(torch.tensor(pruning.values)).all()


def _done(number: int, values: list[float], label: str = "search") -> optuna.trial.FrozenTrial:
    trial = create_trial(values=values, user_attrs={"label": label}, state=TrialState.COMPLETE)
    trial.number = number
    return trial


def test_pick_prefers_the_earlier_uniform_on_a_tie_and_the_knee_on_a_front():
    tie = [_done(0, [0.9], "uniform-lora-r8"), _done(5, [0.9]), _done(6, [0.8])]
    assert pick(tie, ["maximize"]).number == 0
    front = [_done(0, [1.0, -0.9]), _done(1, [0.9, -0.3]), _done(2, [0.5, -0.1]), _done(3, [0.8, -0.5])]
    assert pick(front, ["maximize", "maximize"]).number == 1  # 3 is dominated by 1; 1 is nearest (1, 1)


def test_missing_optuna_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(SearchError, match=r"pip install 'lightning-peft\[search\]'"):
        require_optuna()


def test_bad_settings_are_named():
    with pytest.raises(SearchError, match="compare_seeds"):
        SearchSettings(seed=1, compare_seeds=[1, 2])
    with pytest.raises(SearchError, match="unknown method 'lorra'"):
        SearchSettings(methods=["lorra"])
    assert set(SPECIAL) <= set(build_space(tiny_llama(), SearchSettings(), 10**6).options["attention-outer"])
