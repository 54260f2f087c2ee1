"""`lightning-peft suggest --strategy search`: run the search of `policy_search` and write its outputs.

In the run folder: `search.db` (the Optuna storage, unless `--storage` names another),
`trials/` (one run folder per trial), `trials.csv`, `history.png`, `pareto.png` (two
objectives), `chosen_policy.yaml` (the evidence in its comments), `best_uniform_policy.yaml`,
and with `--compare true` a `comparison/` of the chosen and the best uniform policy on seeds
the search did not use, at the config's full length.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.experiments.compare import Variant, read_curves, run_comparison
from lightning_peft.experiments.policy_search import (
    HEURISTIC,
    Baseline,
    Choice,
    SearchError,
    SearchSettings,
    TrialRunError,
    baseline_from_policy,
    build_space,
    choose,
    directions,
    enqueue_baselines,
    is_uniform,
    make_objective,
    open_study,
    optimize,
    pareto_front,
    require_optuna,
    storage_url,
    trained_trials,
    uniform_baselines,
)
from lightning_peft.experiments.runner import build_model, carried_params, carried_rules, load_config

TRIALS_FILE = "trials.csv"
CHOSEN_FILE = "chosen_policy.yaml"
UNIFORM_FILE = "best_uniform_policy.yaml"


# -- outputs -------------------------------------------------------------------------------------


def trial_rows(study: Any, settings: SearchSettings) -> list[dict[str, Any]]:
    """One row per trial: state, label, objectives, parameters, cost."""
    names = [settings.metric] + ([settings.forget_metric] if settings.forget_metric else [])
    rows = []
    for t in study.get_trials(deepcopy=False):
        values = t.values or [None] * len(names)
        duration = t.duration.total_seconds() if t.duration is not None else None
        row = {"number": t.number, "state": t.state.name, "label": t.user_attrs.get("label", ""),
               **dict(zip(names, values, strict=True)), "trainable": t.user_attrs.get("trainable"),
               "pruned_at": t.user_attrs.get("pruned_at"), "infeasible": t.user_attrs.get("infeasible"),
               "wall_time_s": t.user_attrs.get("wall_time_s"), "duration_s": duration}  # fmt: skip
        row.update(t.params)
        rows.append(row)
    return rows


def write_trials_csv(study: Any, settings: SearchSettings, path: Path) -> Path:
    rows = trial_rows(study, settings)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return path


def draw_history(study: Any, settings: SearchSettings, choice: Choice, path: Path) -> Path:
    """The learning objective per trial (pruned trials at their last report), best-so-far, baselines named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    fig, ax = plt.subplots(figsize=(8, 4.5))
    best, best_x, best_y = None, [], []
    maximize = settings.mode == "max"
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == TrialState.COMPLETE:
            y = t.values[0]
            color = "tab:orange" if is_uniform(t) else "tab:green" if t.user_attrs.get("label") == HEURISTIC else "C0"
            ax.scatter(t.number, y, color=color, zorder=3)
            if t.user_attrs.get("label") != "search":
                ax.annotate(t.user_attrs["label"], (t.number, y), fontsize=7, rotation=30)
            best = y if best is None or (y > best if maximize else y < best) else best
            best_x.append(t.number)
            best_y.append(best)
        elif t.state == TrialState.PRUNED and t.intermediate_values:
            ax.scatter(t.number, list(t.intermediate_values.values())[-1], marker="x", color="grey", zorder=2)
    ax.step(best_x, best_y, where="post", color="black", lw=1, label="best so far")
    ax.scatter([], [], color="tab:orange", label="uniform")
    ax.scatter([], [], color="tab:green", label="heuristic")
    ax.scatter([], [], color="C0", label="searched")
    ax.scatter([], [], marker="x", color="grey", label="pruned (last report)")
    ax.axvline(choice.chosen.number, color="red", lw=0.8, ls=":", label=f"chosen (#{choice.chosen.number})")
    ax.set(xlabel="trial", ylabel=f"{settings.metric} ({settings.score})", title="search history")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_pareto(study: Any, settings: SearchSettings, choice: Choice, path: Path) -> Path:
    """Learning against forgetting for every complete trial; the front joined, the choice circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = sorted(pareto_front(done, directions(study)), key=lambda t: t.values[0])
    fig, ax = plt.subplots(figsize=(6, 5))
    for t in done:
        ax.scatter(*t.values[:2], color="tab:orange" if is_uniform(t) else "C0", alpha=0.8)
        if t.user_attrs.get("label") != "search":
            ax.annotate(t.user_attrs["label"], t.values[:2], fontsize=7)
    ax.plot([t.values[0] for t in front], [t.values[1] for t in front], color="black", lw=1, label="Pareto front")
    ax.scatter(*choice.chosen.values[:2], s=200, facecolors="none", edgecolors="red", label="chosen")
    ax.set(
        xlabel=f"{settings.metric} ({settings.score})", ylabel=settings.forget_metric, title="learning vs forgetting"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def describe(trial: Any, settings: SearchSettings) -> str:
    names = [settings.metric] + ([settings.forget_metric] if settings.forget_metric else [])
    values = ", ".join(f"{n} {v:.4g}" for n, v in zip(names, trial.values, strict=True))
    trainable = trial.user_attrs.get("trainable", 0)
    return f"trial {trial.number} ({trial.user_attrs.get('label')}): {values}, {trainable:,} trainable"


def policy_text(trial: Any, header: Sequence[str]) -> str:
    """The trial's policy as YAML under comment lines."""
    import yaml

    body = yaml.safe_dump(trial.user_attrs["policy"], default_flow_style=None, sort_keys=False, width=10_000)
    return "".join(f"# {line}\n" for line in header) + body


def evidence(study: Any, settings: SearchSettings, choice: Choice) -> list[str]:
    """The comment lines of `chosen_policy.yaml`: what was measured, and how the choice was made."""
    trained = trained_trials(study)
    pruned = sum(1 for t in trained if t.state.name == "PRUNED")
    rule = "best value" if settings.forget_metric is None else "the Pareto trial nearest the ideal point"
    lines = [
        f"lightning-peft suggest --strategy search: {len(trained)} trials trained ({pruned} pruned early), "
        f"seed {settings.seed}, score = {settings.score} {settings.metric}",
        f"chosen by {rule} (docs/suggest.md): {describe(choice.chosen, settings)}",
    ]
    lines += [f"  {g}" for g in choice.chosen.user_attrs.get("groups", [])]
    if choice.uniform_wins and choice.best_other is not None and choice.best_other.values is None:
        lines.append(f"every per-layer policy was pruned; the furthest: trial {choice.best_other.number}")
    if choice.chosen.user_attrs.get("label") == HEURISTIC:
        lines.append(f"  the heuristic's evidence per module: {HEURISTIC}/suggested_policy.yaml")
    if choice.best_uniform is not None:
        lines.append(f"best uniform policy: {describe(choice.best_uniform, settings)}")
    if choice.uniform_wins:
        lines.append("UNIFORM WINS: no per-layer policy measured better than this uniform one")
    elif choice.best_uniform is not None:
        lines.append(f"against the best uniform policy (search seed): {gaps(choice, settings)}")
    return lines


def gaps(choice: Choice, settings: SearchSettings) -> str:
    """Per objective, how far the chosen trial is ahead of (or behind) the best uniform one."""
    names = [settings.metric] + ([settings.forget_metric] if settings.forget_metric else [])
    modes = [settings.mode] + ([settings.forget_mode] if settings.forget_metric else [])
    parts = []
    for i, (name, mode) in enumerate(zip(names, modes, strict=True)):
        diff = choice.chosen.values[i] - choice.best_uniform.values[i]
        ahead = diff > 0 if mode == "max" else diff < 0
        parts.append(f"{name} {'better' if ahead else 'worse'} by {abs(diff):.4g}")
    return ", ".join(parts)


def top_table(study: Any, settings: SearchSettings, choice: Choice, top: int = 8) -> Any:
    """A rich table of the best complete trials, the uniform ones always included."""
    from optuna.trial import TrialState
    from rich.table import Table

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = -1 if settings.mode == "max" else 1
    ranked = sorted(done, key=lambda t: (sign * t.values[0], t.number))
    shown = [t for i, t in enumerate(ranked) if i < top or is_uniform(t) or t is choice.chosen]
    table = Table(title=f"search: {len(done)} complete of {len(study.trials)} trials")
    for col in ("trial", "label", settings.metric, *([settings.forget_metric] if settings.forget_metric else []),
                "trainable", "policy"):  # fmt: skip
        table.add_column(col)
    for t in shown:
        mark = " (chosen)" if t.number == choice.chosen.number else ""
        groups = "; ".join(t.user_attrs.get("groups", [])) or t.user_attrs.get("label", "")
        table.add_row(str(t.number), f"{t.user_attrs.get('label')}{mark}", *[f"{v:.4g}" for v in t.values],
                      f"{t.user_attrs.get('trainable', 0):,}", groups)  # fmt: skip
    return table


# -- held-out seeds ----------------------------------------------------------------------------------


@dataclass
class HeldOut:
    """Per policy, the learning score and (two objectives) the forgetting metric on each held-out seed."""

    scores: dict[str, list[float]] = field(default_factory=dict)
    forgetting: dict[str, list[float]] = field(default_factory=dict)

    @staticmethod
    def spread(vals: list[float]) -> str:
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.fmean(vals):.4g} ± {sd:.2g}"

    def line(self, name: str) -> str:
        forget = f", forgetting {self.spread(self.forgetting[name])}" if self.forgetting.get(name) else ""
        return f"{name}: {self.spread(self.scores[name])}{forget} over {len(self.scores[name])} seeds"


def compare_held_out(
    config: str | Path, contenders: dict[str, Any], settings: SearchSettings, out_dir: Path
) -> HeldOut:
    """Each contender policy on every `compare_seeds` seed, at the config's length, through `compare`."""

    variants = [Variant(f"{name}-s{seed}", {"adapters.policy": trial.user_attrs["policy"], "seed_everything": seed})
                for name, trial in contenders.items() for seed in settings.compare_seeds]  # fmt: skip
    records = run_comparison(config, variants, out_dir, metric=settings.metric, forget_metric=settings.forget_metric)
    finals = {r.name: r.metrics for r in records if r.status == "ok"}
    curves = read_curves(out_dir, list(finals))
    held = HeldOut()
    for name in contenders:
        for seed in settings.compare_seeds:
            values = [c[settings.metric] for c in curves.get(f"{name}-s{seed}", []) if settings.metric in c]
            if values and all(math.isfinite(v) for v in values):
                score = values[-1] if settings.score == "last" else statistics.fmean(values)
                held.scores.setdefault(name, []).append(score)
            forget = finals.get(f"{name}-s{seed}", {}).get(settings.forget_metric or "", math.nan)
            if settings.forget_metric and math.isfinite(forget):
                held.forgetting.setdefault(name, []).append(forget)
    return held


def verdict(held: HeldOut, names: dict[str, Any], settings: SearchSettings) -> str:
    """Which policy won on the held-out seeds (means compared, the spread printed beside them).

    Two objectives: a policy wins when its means are at least as good on both; otherwise the
    line says which one learns more and which forgets less (a trade-off, no winner).
    """
    if any(name not in held.scores for name in names):
        return "held-out comparison incomplete: see the comparison folder for the failed runs"
    sign = 1 if settings.mode == "max" else -1
    learn = max(names, key=lambda n: sign * statistics.fmean(held.scores[n]))
    lines = "; ".join(held.line(n) for n in names)
    head = f"held-out seeds {settings.compare_seeds}, {settings.score} {settings.metric}: {lines}"
    if settings.forget_metric and all(held.forgetting.get(n) for n in names):
        fsign = 1 if settings.forget_mode == "max" else -1
        keep = max(names, key=lambda n: fsign * statistics.fmean(held.forgetting[n]))
        if keep != learn:
            return f"{head} -> a trade-off: {learn} learns more, {keep} forgets less"
    who = f"UNIFORM WINS ({learn})" if is_uniform(names[learn]) else f"the per-layer policy ({learn}) wins"
    return f"{head} -> {who}"


# -- the command -----------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """The written policy, the study's choice and, with `--compare`, the held-out scores."""

    policy_path: Path
    choice: Choice
    held_out: HeldOut | None = None
    messages: list[str] = field(default_factory=list)


def heuristic_baseline(
    config: str | Path, suggest_settings: Any, space: Any, model: Any, out: Path, heuristic: Callable[..., Any]
) -> Baseline:
    """The heuristic `suggest`'s policy (its pilot run in `out/heuristic`) as a baseline.

    `heuristic` is `suggest.suggest`, passed in by the caller so the search does not import the heuristic back.
    """
    import yaml

    result = heuristic(config, out / HEURISTIC, suggest_settings)
    policy = yaml.safe_load(Path(result.policy_path).read_text())
    return baseline_from_policy(space, HEURISTIC, policy, model)


def prepare(
    config: str | Path,
    suggest_settings: Any,
    settings: SearchSettings,
    out: Path,
    storage: str | None,
    heuristic: Callable[..., Any] | None = None,
) -> tuple[Any, Any, Any]:
    """Model, space and study, with the baselines enqueued; every input error before anything trains."""

    require_optuna()
    cfg = load_config(config)
    model = build_model(cfg)
    carried = carried_rules(cfg)
    spare = suggest_settings.budget - carried_params(model, carried)
    if spare <= 0:
        raise SearchError(f"the carried rules alone exceed the budget of {suggest_settings.budget:,}")
    space = build_space(model, settings, spare, carried)
    baselines = uniform_baselines(space)
    study = open_study(storage_url(storage, out), settings, space.fingerprint(), startup=len(baselines) + 3)
    present = {t.user_attrs.get("label") for t in study.get_trials(deepcopy=False)}
    if settings.heuristic and heuristic is not None and HEURISTIC not in present:
        baselines.append(heuristic_baseline(config, suggest_settings, space, model, out, heuristic))
    enqueue_baselines(study, baselines)
    return model, space, study


def search_command(
    config: str | Path,
    suggest_settings: Any,
    settings: SearchSettings,
    out_dir: str | Path = "suggestions",
    compare: bool = False,
    storage: str | None = None,
    heuristic: Callable[..., Any] | None = None,
) -> SearchResult:
    """Search, write the outputs, optionally re-run the choice against the best uniform policy on held-out seeds.

    `heuristic`: the heuristic `suggest` whose policy joins the enqueued first trials (`suggest_command` passes it).
    """
    from rich import get_console

    console = get_console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, space, study = prepare(config, suggest_settings, settings, out, storage, heuristic)
    console.print(f"search space: {len(space.groups)} groups " + ", ".join(
        f"{g.name} ({len(g.modules)} modules: {'/'.join(space.options[g.name])})" for g in space.groups))  # fmt: skip
    objective = make_objective(config, space, model, settings, out)
    optimize(study, objective, settings.n_trials, settings.timeout_s, catch=(TrialRunError,))
    choice = choose(study)
    write_trials_csv(study, settings, out / TRIALS_FILE)
    draw_history(study, settings, choice, out / "history.png")
    if settings.forget_metric is not None:
        draw_pareto(study, settings, choice, out / "pareto.png")
    lines = evidence(study, settings, choice)
    path = out / CHOSEN_FILE
    path.write_text(policy_text(choice.chosen, lines))
    if choice.best_uniform is not None:
        (out / UNIFORM_FILE).write_text(policy_text(choice.best_uniform, [describe(choice.best_uniform, settings)]))
    console.print(top_table(study, settings, choice))
    messages = lines[1:2] + lines[-1:]
    result = SearchResult(path, choice, messages=messages)
    if compare:
        result.held_out = held_out_step(config, choice, settings, out / "comparison", result.messages)
    for line in result.messages:
        console.print(line)
    console.print(f"policy written to {path}; trials in {out / TRIALS_FILE}, figures in {out}")
    return result


def held_out_step(config: str | Path, choice: Choice, settings: SearchSettings, out: Path, messages: list[str]) -> Any:
    """`--compare true`: the chosen policy against the best uniform one (or, when uniform won, the best other)."""
    if choice.best_uniform is None:
        messages.append("no uniform policy completed: nothing to compare the choice with")
        return None
    rival = choice.best_other if choice.uniform_wins else choice.best_uniform
    if rival is None:
        messages.append("every complete trial was uniform: nothing to compare with")
        return None
    names = {f"chosen-{_slug(choice.chosen)}": choice.chosen, _slug(rival): rival}
    held = compare_held_out(config, names, settings, out)
    messages.append(verdict(held, names, settings))
    (out / "held_out.json").write_text(json.dumps({"score": held.scores, "forgetting": held.forgetting}, indent=2))
    return held


def _slug(trial: Any) -> str:
    label = str(trial.user_attrs.get("label", "search"))
    return label if label != "search" else f"trial{trial.number}"
