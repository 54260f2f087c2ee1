"""`lightning-peft compare rank-search` and `lightning-peft suggest` end to end on a tiny UUID task."""

from __future__ import annotations

import csv

import pytest
import yaml
from helpers import TINY_CAUSAL_LM

from lightning_peft import LayerPolicy
from lightning_peft.cli.main import main
from lightning_peft.experiments.compare import read_comparison

TINY = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "check_val_every_n_epoch": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    },
    "model": {**TINY_CAUSAL_LM, "init_args": {**TINY_CAUSAL_LM["init_args"], "lr": 0.003}},
    "data": {"class_path": "lightning_peft.tasks.UUIDMemorization", "init_args": {"num_pairs": 8, "batch_size": 8}},
    "adapters": {"policy": "lora_all"},
    "diagnostics": {"every_n_steps": 1, "plots": False},
}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


@pytest.mark.slow
def test_rank_search_command(tiny_config, tmp_path, capsys):
    search = {
        "base": str(tiny_config),
        "out_dir": str(tmp_path / "out"),
        "search": {"metric": "val_loss", "mode": "min", "ranks": [1, 2], "widen": ["qv", "attention"], "plateau": 10.0},
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    assert run_cli(["compare", "rank-search", "--config", str(tmp_path / "search.yaml")]) == 0
    out = tmp_path / "out"
    steps = list(csv.DictReader((out / "rank_search.csv").open()))
    # a plateau of 10 loss units: r=2 cannot gain that much, nor can widening: r1 on q,v is chosen
    assert [s["variant"] for s in steps] == ["r1-qv", "r2-qv", "r1-attention"]
    assert steps[0]["decision"] == "first (chosen)"
    records = read_comparison(out)
    assert [r.name for r in records] == ["r1-qv", "r2-qv", "r1-attention"]
    assert all(r.status == "ok" for r in records)
    assert records[1].trainable_params == 2 * records[0].trainable_params
    plan = LayerPolicy.from_yaml(out / "chosen_policy.yaml").resolve(_module())
    assert {r.kind for r in plan.rows} == {"self_attn.q_proj", "self_attn.v_proj"}
    assert plan.trainable_params == records[0].trainable_params
    assert (out / "rank_search.png").read_bytes()[:4] == b"\x89PNG"
    assert "chosen: lora r=1 on qv" in capsys.readouterr().out


def test_rank_search_bad_step_fails_before_any_run(tiny_config, tmp_path, capsys):
    search = {"base": str(tiny_config), "out_dir": str(tmp_path / "out"), "search": {"metric": "val_loss"}}
    search["search"]["widen"] = ["qv", "attention_and_more"]
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    assert run_cli(["compare", "rank-search", "--config", str(tmp_path / "search.yaml")]) == 2
    assert "unknown widening step 'attention_and_more'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    search["search"]["widen"] = ["qv", {"convs": ["conv*"]}]
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    assert run_cli(["compare", "rank-search", "--config", str(tmp_path / "search.yaml")]) == 2
    assert "widening step 'convs' (['conv*']) adapts no module of CausalLM" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _module():
    from lightning_peft.experiments.runner import build_model

    return build_model(TINY)


@pytest.mark.slow
def test_suggest_command_with_comparison(tiny_config, tmp_path):
    out = tmp_path / "sg"
    budget = 3000
    args = ["suggest", str(tiny_config), "--settings.budget", str(budget), "--settings.pilot_steps", "2"]
    assert run_cli([*args, "--out_dir", str(out), "--compare", "true"]) == 0
    policy = out / "suggested_policy.yaml"
    written = LayerPolicy.from_yaml(policy).resolve(_module()).trainable_params
    assert written <= budget
    assert f"trainable parameters: {written:,} of a budget of {budget:,}" in policy.read_text()
    records = {r.name: r for r in read_comparison(out / "comparison")}
    # LoRA costs 1,024 per rank here (2 blocks x 512) and DoRA 256 magnitudes per block more: the largest
    # uniform ranks within 3,000 are LoRA 2, DoRA 2; MoRA's square M reaches r=3
    assert set(records) == {"suggested", "lora-r2", "dora-r2", "mora-r3"}
    assert records["lora-r2"].trainable_params == 2048 and records["dora-r2"].trainable_params == 2048 + 512
    assert all(r.status == "ok" for r in records.values())
    assert records["suggested"].trainable_params == written  # what really trained is what the file says
    assert all(r.trainable_params <= budget for r in records.values())


def test_suggest_command_refuses_a_tiny_budget_before_the_pilot(tiny_config, tmp_path, capsys):
    args = ["suggest", str(tiny_config), "--settings.budget", "10", "--out_dir", str(tmp_path / "sg")]
    assert run_cli(args) == 2
    assert "budget 10 is smaller than any policy" in capsys.readouterr().err
    assert not (tmp_path / "sg").exists()


@pytest.mark.slow
def test_suggest_search_command_end_to_end(tmp_path, capsys):
    """`--strategy search` on the tiny task: uniform trials first, outputs written, a resumed run trains nothing."""
    import optuna

    config = dict(TINY, trainer={**TINY["trainer"], "max_steps": 4, "val_check_interval": 2,
                                 "check_val_every_n_epoch": None})  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "search"
    args = ["suggest", str(path), "--strategy", "search", "--settings.budget", "3000", "--settings.pilot_steps", "2"]
    args += ["--out_dir", str(out), "--search.n_trials", "6", "--search.compare_seeds", "[1]", "--compare", "true"]
    assert run_cli(args) == 0
    printed = capsys.readouterr().out
    assert "held-out seeds [1]" in printed and "policy written to" in printed
    rows = list(csv.DictReader((out / "trials.csv").open()))
    uniform = ["uniform-lora-r2", "uniform-dora-r2", "uniform-hira-r2", "uniform-mora-r3"]
    assert [r["label"] for r in rows[:5]] == [*uniform, "heuristic"]
    assert sum(r["state"] in ("COMPLETE", "PRUNED") and not r["infeasible"] for r in rows) >= 6
    chosen = LayerPolicy.from_yaml(out / "chosen_policy.yaml").resolve(_module())
    assert 0 < chosen.trainable_params <= 3000
    assert "chosen by best value" in (out / "chosen_policy.yaml").read_text()
    assert (out / "history.png").stat().st_size > 10_000
    records = read_comparison(out / "comparison")
    assert len(records) == 2 and all(r.status == "ok" and r.name.endswith("-s1") for r in records)
    # a second run of the same command resumes the finished search: no trial is added
    study = optuna.load_study(study_name="suggest", storage=f"sqlite:///{out / 'search.db'}")
    before = len(study.trials)
    assert run_cli([*args[:-2], "--compare", "false"]) == 0
    assert len(optuna.load_study(study_name="suggest", storage=f"sqlite:///{out / 'search.db'}").trials) == before
