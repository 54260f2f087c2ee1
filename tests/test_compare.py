"""`lightning-peft compare`: tiny variants end to end, resume, failures, bad input before any run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

import lightning_peft.experiments.compare as compare_module
from lightning_peft.cli.main import main
from lightning_peft.experiments.compare import (
    CompareError,
    Variant,
    parse_variants,
    read_comparison,
    read_curves,
    run_comparison,
    validate_variants,
)
from lightning_peft.experiments.figures import pareto_front

REPO = Path(__file__).resolve().parent.parent
LORA = "lora_all"  # preset names
DORA = "dora_all"


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> Path:
    """A tiny continual-UUID fit: 2-block Llama (hidden 16), 4 steps, validation every 2, forgetting on."""
    folder = tmp_path_factory.mktemp("compare")
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 4, "val_check_interval": 2,
            "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": [{"class_path": "lightning_peft.callbacks.forgetting.ForgettingMonitor",
                           "init_args": {"prior": {"class_path": "lightning_peft.tasks.UUIDRecall"}}}],
        },
        "model": {"class_path": "lightning_peft.tasks.UUIDContinualLM", "init_args": {
            "prior_pairs": 2, "prior_steps": 5, "cache_dir": str(folder / "cache"), "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "lr": 0.01}},
        "data": {"class_path": "lightning_peft.tasks.UUIDMemorization",
                 "init_args": {"num_pairs": 2, "batch_size": 2, "seed": 0}},
        "adapters": {"policy": LORA, "verbose": False},
        "diagnostics": {"every_n_steps": 2, "plots": False},
    }  # fmt: skip
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_variants_end_to_end_then_resume_skips_them(base_config, tmp_path, monkeypatch):
    variants = [{"name": "lora", "policy": LORA}, {"name": "dora_r2", "policy": DORA, "rank": 2, "lr": 0.02}]
    records = run_comparison(base_config, variants, tmp_path)

    assert [r.name for r in records] == ["lora", "dora_r2"] and all(r.status == "ok" for r in records)
    lora, dora = records
    # LoRA r=8 on 7 Linear per block, 2 blocks, hidden 16 / MLP 32 / kv 8: sum of r * (in + out)
    per_block = 8 * ((16 + 16) + (16 + 8) * 2 + (16 + 16) + (16 + 32) * 2 + (32 + 16))
    assert lora.trainable_params == 2 * per_block
    assert dora.trainable_params == 2 * (per_block // 4 + (16 + 8 + 8 + 16 + 32 + 32 + 16))  # r=2 + magnitudes
    assert math.isfinite(lora.step_time_median_s) and lora.peak_memory_mb > 0
    for r in records:
        assert {"val_char_acc", "forget/prior_char_acc", "forget/prior_char_acc_change"} <= set(r.metrics)
    assert dora.overrides["model.init_args.lr"] == 0.02
    assert dora.overrides["adapters.policy"]["rules"][0]["hparams"] == {"r": 2, "alpha": 4.0}  # alpha/r kept

    assert read_comparison(tmp_path) == [
        compare_module.VariantRecord(**{**vars(r), "fingerprint": ""}) for r in records
    ]  # the CSV round-trips everything but the fingerprint
    curves = read_curves(tmp_path)
    assert [c["step"] for c in curves["lora"]] == [2.0, 4.0]
    assert curves["lora"][-1]["val_char_acc"] == pytest.approx(lora.metrics["val_char_acc"])
    with open(tmp_path / "comparison_depth.csv") as f:
        depth = list(csv.DictReader(f))
    assert {(d["variant"], d["method"], d["block"]) for d in depth} == {
        ("lora", "lora", "0"), ("lora", "lora", "1"), ("dora_r2", "dora", "0"), ("dora_r2", "dora", "1")
    }  # fmt: skip
    for name in ("metric_vs_params", "learn_vs_forget", "depth_diagnostics"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"  # data: test_figures.py
    assert (tmp_path / "lora" / "forgetting.csv").is_file() and (tmp_path / "lora" / "csv" / "metrics.csv").is_file()

    monkeypatch.setattr(compare_module, "run_variant", lambda *a, **k: pytest.fail("a finished variant ran again"))
    again = run_comparison(base_config, variants, tmp_path, figures=False, table=False)
    assert [vars(a) for a in again] == [vars(r) for r in records]


def test_a_failing_variant_is_recorded_and_the_others_run(base_config, tmp_path, capsys):
    spec = {
        "base": str(base_config),
        "out_dir": str(tmp_path),
        "variants": [
            {"name": "nothing_matches", "policy": {"rules": [{"method": "lora", "modules": ["no_such_layer"]}]}},
            {"name": "lora", "policy": LORA},
        ],
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--config", str(tmp_path / "spec.yaml"), "--figures", "false"])
    assert exit_info.value.code == 1
    assert "1 variant(s) failed: nothing_matches" in capsys.readouterr().err
    bad, good = read_comparison(tmp_path)
    assert bad.status == "failed" and "PolicyError" in bad.error and "no_such_layer" in bad.error
    assert good.status == "ok" and "val_char_acc" in good.metrics
    record = json.loads((tmp_path / "nothing_matches" / "record.json").read_text())
    assert record["status"] == "failed"


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ([{"name": "a", "polcy": LORA}], r"unknown key\(s\) \['polcy'\]"),
        ([{"name": "a", "policy": LORA}, {"name": "a", "policy": DORA}], "duplicate name 'a'"),
        ([{"name": "a"}], "names no policy and no override"),
        ([{"name": "a", "overrides": {}}], "names no policy and no override"),
        ([{"policy": LORA}], "needs a `name`"),
        ([{"name": "../up", "policy": LORA}], "names a directory"),
        ([], "non-empty list"),
    ],
)
def test_bad_variants_are_named_before_reading_any_config(variants, message):
    with pytest.raises(CompareError, match=message):
        parse_variants(variants)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({"overrides": {"model.init_args.nope": 1}}, "variant 'v'.*nope"),
        ({"overrides": {"trainer.max_stepz": 3}}, "variant 'v'.*max_stepz"),
        ({"overrides": {"trainer.max_steps": "many"}}, "variant 'v'.*max_steps"),
        ({"policy": "no_such_policy"}, "variant 'v'.*no_such_policy"),
        ({"policy": {"rules": [{"method": "lora", "modules": ["*"], "hparams": {"rnak": 4}}]}}, "variant 'v'.*rnak"),
        ({"rank": 4, "policy": {"rules": [{"method": "full", "modules": ["*"]}]}}, "no rule of its policy has an `r`"),
        ({"rank": 0, "policy": LORA}, "rank must be a positive integer"),
        ({"lr": 0.1, "overrides": {"model.init_args.lr": 0.2}}, "both set"),
    ],
)
def test_bad_overrides_fail_before_any_run_and_write_nothing(base_config, tmp_path, variant, message, monkeypatch):
    monkeypatch.setattr(compare_module, "run_variant", lambda *a, **k: pytest.fail("a variant ran"))
    good = Variant("ok", {"adapters.policy": LORA})
    with pytest.raises(CompareError, match=f"(?s){message}"):
        run_comparison(base_config, [good, {"name": "v", **variant}], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_policy_mapping_replaces_the_base_policy_instead_of_merging_into_it(base_config):
    policy = {"rules": [{"method": "lora", "modules": ["q_proj"]}]}
    (variant,) = validate_variants(base_config, [{"name": "qv", "policy": policy}])
    parsed = compare_module._parse(base_config, variant.overrides, "qv")
    rule = compare_module._policy_value(parsed)["rules"][0]
    assert {k: v for k, v in rule.items() if v not in (None, {})} == policy["rules"][0]  # nothing from lora_all.yaml


def test_missing_base_config_and_foreign_folders_are_refused(base_config, tmp_path):
    with pytest.raises(CompareError, match="does not exist"):
        run_comparison(tmp_path / "nope.yaml", [{"name": "a", "policy": LORA}], tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    with pytest.raises(CompareError, match="not written by compare"):
        run_comparison(base_config, [{"name": "a", "policy": LORA}], tmp_path)
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"


def test_pareto_front():
    points = [(10, 0.5), (20, 0.4), (20, 0.7), (5, 0.1), (40, 0.7), (50, 0.9)]
    assert pareto_front(points) == [3, 0, 2, 5]


def test_a_checkpoint_folder_fixed_in_the_base_config_is_refused(base_config, tmp_path):
    config = yaml.safe_load(base_config.read_text())
    config["trainer"]["callbacks"].append(
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(tmp_path / "ck")}}
    )
    shared = tmp_path / "shared.yaml"
    shared.write_text(yaml.safe_dump(config))
    with pytest.raises(CompareError, match="fixed dirpath"):
        run_comparison(shared, [{"name": "a", "policy": LORA}], tmp_path / "out")
