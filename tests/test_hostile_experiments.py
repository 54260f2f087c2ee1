"""Hostile input on the experiment and training surfaces (issue 22, classes 5-7; issue 21's YAML point).

Each class has tests of its own; every refusal names the culprit (file, line, column, variant,
rule, argument) and happens before anything trains, with nothing written, deleted or changed.

- Resume that silently mixes states: `compare` fingerprints the files a config names; a fit
  resumed after a rule's `optim:` changed is refused by rule.
- Sizes and budgets that make no sense: `suggest` budgets above the layers' own size, probes
  with no items or identical texts, restart settings.
- Readers and names: a hand-edited `comparison.csv`, variant names that cannot be folders, a
  rank search whose later steps could not run.
- YAML read as written on every experiment route.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_CAUSAL_LM, CausalLMModule, token_loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_optim_groups import BASE_LR, POLICY, WarmupModule

import lightning_peft.experiments.compare as compare_module
import lightning_peft.experiments.rank_search as rank_search_module
import lightning_peft.experiments.suggest as suggest_module
from lightning_peft import AdapterCallback, LayerPolicy, restore_from_checkpoint
from lightning_peft.callbacks.forgetting import EmbeddingDrift, drift_metrics
from lightning_peft.callbacks.optim_groups import GROUP_TAG
from lightning_peft.callbacks.restart import JaggedCosineLR, MergeRestart, RestartError
from lightning_peft.core.stored import AdapterStateError
from lightning_peft.experiments.compare import CompareError, Variant, parse_variants, run_comparison
from lightning_peft.experiments.fingerprint import fingerprint, referenced_contents
from lightning_peft.experiments.rank_search import RankSearchError, SearchSettings, run_rank_search
from lightning_peft.experiments.records import VariantRecord, read_comparison, write_comparison
from lightning_peft.experiments.runner import carried_rules, load_config
from lightning_peft.experiments.suggest import (
    ModuleEvidence,
    SuggestError,
    SuggestSettings,
    check_before_pilot,
    comparison_variants,
    pilot_policy,
    suggest,
    suggest_from_evidence,
)
from lightning_peft.tasks import HeldOutDocDrift, UUIDRecall, held_out_texts, make_uuid_pairs

TINY_MODEL = TINY_CAUSAL_LM


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the hash of its bytes: 'nothing written, deleted or changed'."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_config(folder: Path, **sections) -> Path:
    config = {"trainer": {"accelerator": "cpu", "max_steps": 2}, "model": TINY_MODEL, **sections}
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# == class 5: resume that silently mixes states =====================================================


def policy_file(path: Path, r: int) -> Path:
    path.write_text(yaml.safe_dump({"rules": [{"method": "lora", "modules": ["*"], "hparams": {"r": r}}]}))
    return path


def test_the_fingerprint_covers_every_file_a_config_names_nested_and_presets(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("one")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"init_args": {"data_file": "data.txt"}}))
    policy = policy_file(tmp_path / "mine.yaml", 4)
    config = write_config(tmp_path, adapters={"policy": str(policy)})
    config.write_text(config.read_text() + "extra: model.yaml\n")  # a nested config, relative to the config
    overrides = {"adapters.policy": str(policy), "other": "lora_all"}

    before = fingerprint(config, overrides, 0)
    lines = referenced_contents(config, overrides)
    assert any(line.startswith(f"{policy.resolve()}:") for line in lines)
    assert any(line.startswith(f"{data.resolve()}:") for line in lines)  # named by a file the config names
    assert any(line.startswith("preset lora_all:") for line in lines)
    assert fingerprint(config, overrides, 0) == before  # stable

    policy_file(policy, 8)
    after_policy = fingerprint(config, overrides, 0)
    data.write_text("two")
    after_data = fingerprint(config, overrides, 0)
    assert len({before, after_policy, after_data}) == 3


def fake_run(calls: list[str]):
    def run_variant(config, variant, out_dir, seed=None, shared=None):
        calls.append(variant.name)
        record = VariantRecord(
            variant.name, "ok", None, {"val_acc": 0.5}, 10, 0.1, 1.0, str(Path(out_dir) / variant.name)
        )
        return record, [], []

    return run_variant


def test_compare_runs_a_variant_again_after_the_policy_file_it_names_changed(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(compare_module, "run_variant", fake_run(calls))
    policy = policy_file(tmp_path / "mine.yaml", 4)
    config = write_config(tmp_path, adapters={"policy": "lora_all"})
    variants = [Variant("mine", {"adapters.policy": str(policy)}), Variant("preset", {"adapters.policy": "lora_all"})]

    def run():
        run_comparison(config, variants, tmp_path / "out", figures=False, table=False)

    run()
    assert calls == ["mine", "preset"]
    run()
    assert calls == ["mine", "preset"]  # nothing changed: both skipped
    policy_file(policy, 8)  # the file the variant names is edited; its name is not
    run()
    assert calls == ["mine", "preset", "mine"]


def resume_run(folder: Path, policy: dict, max_steps: int, ckpt_path: Path | None = None):
    module = WarmupModule(lr=BASE_LR)
    ckpt = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    tr = trainer(folder, max_steps=max_steps, enable_checkpointing=True, callbacks=[AdapterCallback(policy), ckpt])
    tr.fit(module, train_dataloaders=token_loader(), ckpt_path=ckpt_path)
    return tr, module


@pytest.fixture(scope="module")
def two_step_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume")
    resume_run(folder, POLICY, 2)
    return folder / "step=2.ckpt"


def changed_rate(policy):
    policy["rules"][0]["optim"] = {"lr_scale": 2}  # as many param groups: torch would keep the old rates silently
    return "rule 'mora-outer'.*checkpoint lr_scale 4, now lr_scale 2"


def dropped_settings(policy):
    policy["rules"][1].pop("optim")  # fewer param groups: torch would fail naming no rule
    return "rule 'lora-inner'.*checkpoint lora_plus_ratio 16, weight_decay 0, now no optim settings"


@pytest.mark.parametrize("change", [changed_rate, dropped_settings])
def test_resuming_after_a_rule_optim_change_is_refused_by_rule(two_step_checkpoint, tmp_path, change):
    policy = copy.deepcopy(POLICY)
    message = change(policy)
    before = tree(two_step_checkpoint.parent)
    with pytest.raises(AdapterStateError, match=f"(?s)step=2.ckpt: cannot resume.*{message}.*set these rules"):
        resume_run(tmp_path, policy, 4, ckpt_path=two_step_checkpoint)
    assert tree(two_step_checkpoint.parent) == before
    assert not list(tmp_path.glob("*.ckpt"))  # nothing trained, nothing saved


def test_new_settings_apply_to_a_fit_started_from_the_checkpoints_weights(two_step_checkpoint, tmp_path):
    """The way out the error names: `restore_from_checkpoint`, then a fit without `ckpt_path`."""
    policy = copy.deepcopy(POLICY)
    changed_rate(policy)
    module = WarmupModule(lr=BASE_LR)
    restore_from_checkpoint(module, two_step_checkpoint)
    tr = trainer(tmp_path, max_steps=1, callbacks=[AdapterCallback(policy, verbose=False)])
    tr.fit(module, train_dataloaders=token_loader())
    rates = {g[GROUP_TAG]: g["initial_lr"] for g in tr.optimizers[0].param_groups}
    assert rates == pytest.approx({"mora-outer": 2 * BASE_LR, "lora-inner/A": BASE_LR, "lora-inner/B": 16 * BASE_LR})


def test_resuming_with_the_same_settings_still_works(two_step_checkpoint, tmp_path):
    tr, _ = resume_run(tmp_path, copy.deepcopy(POLICY), 3, ckpt_path=two_step_checkpoint)
    assert tr.global_step == 3


# == class 6: sizes and budgets that make no sense ================================================


def evidence_for(model, low_kinds=("mlp.up_proj", "mlp.down_proj")) -> list[ModuleEvidence]:
    """Pilot evidence where some kinds moved little (low tier), the others moderately (base tier)."""
    plan = LayerPolicy.from_dict(pilot_policy(SuggestSettings(budget=10**9), [])).resolve(model)
    return [
        ModuleEvidence(
            r.name, r.block, r.kind, r.in_features, r.out_features, 0.2 if r.kind in low_kinds else 1.0, 2, 2.5, 0.2, 4
        )
        for r in plan.rows
    ]


def layer_weights(model) -> int:
    return sum(e.in_features * e.out_features for e in evidence_for(model))


def test_a_budget_above_the_layers_own_size_is_refused_before_the_pilot(tmp_path):
    model = CausalLMModule()
    full = layer_weights(model)
    message = f"budget {full:,} is at least what training all 42 candidate layers in full costs \\({full:,}"
    with pytest.raises(SuggestError, match=message):
        check_before_pilot(model, SuggestSettings(budget=full), [])
    with pytest.raises(SuggestError, match="method 'full'"):
        suggest_from_evidence(evidence_for(model), model, SuggestSettings(budget=10 * full), tmp_path / "p.yaml")
    assert not list(tmp_path.iterdir())


def test_suggest_refuses_a_huge_budget_before_training_or_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(suggest_module, "run_fit", lambda *a, **k: pytest.fail("the pilot ran"))
    config = write_config(tmp_path, adapters={"policy": "lora_all"})
    with pytest.raises(SuggestError, match="candidate layers in full"):
        suggest(config, tmp_path / "out", SuggestSettings(budget=10**12))
    assert not (tmp_path / "out").exists()


def test_no_suggested_adapter_outgrows_its_layer_under_a_budget_just_below_it(tmp_path):
    """Low-rank rules leave spare budget; without a cap the others grew past their layers' size."""
    model = CausalLMModule()
    settings = SuggestSettings(budget=layer_weights(model) - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the policy's own "method 'full' would be cheaper" warning
        result = suggest_from_evidence(evidence_for(model), model, settings, tmp_path / "p.yaml")
        plans = [LayerPolicy.from_yaml(result.policy_path).resolve(model)]
        baselines = comparison_variants(result, settings, [], settings.budget)[1:]  # uniform LoRA, DoRA, MoRA
        plans += [LayerPolicy.load(v.overrides["adapters.policy"]).resolve(model) for v in baselines]
    assert len(plans) == 4 and all(plan.rows for plan in plans)
    assert all(r.params <= r.in_features * r.out_features for plan in plans for r in plan.rows)
    assert plans[0].trainable_params == result.trainable_params < layer_weights(model)


THREE = ["one text", "another text", "a third text"]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: UUIDRecall(num_pairs=0, seed=0), "UUIDRecall: num_pairs must be a positive integer, got 0"),
        (lambda: UUIDRecall(num_pairs=-3, seed=0), "num_pairs must be a positive integer"),
        (lambda: UUIDRecall(num_pairs=2.0, seed=0), "num_pairs must be a positive integer"),
        (lambda: UUIDRecall(num_pairs=2, seed="a"), "UUIDRecall: seed must be an integer"),
        (lambda: UUIDRecall(batch_size=0), "UUIDRecall: batch_size must be a positive integer"),
        (lambda: EmbeddingDrift(texts=["same text"] * 5), "texts 0 and 1 are the same text"),
        (lambda: EmbeddingDrift(texts=["a b", "c", "a  b "]), "texts 0 and 2 are the same text"),
        (lambda: EmbeddingDrift(texts=["a", " ", "c"]), "text 1 must be a non-empty string"),
        (lambda: EmbeddingDrift(texts=["a", "b"]), "need at least 3 texts, got 2"),
        (lambda: EmbeddingDrift(texts=[]), "need at least 3 texts, got 0"),
        (lambda: EmbeddingDrift(texts="one long text"), "texts must be a list of strings"),
        (lambda: EmbeddingDrift(THREE, max_length=0), "EmbeddingDrift: max_length must be a positive integer"),
        (lambda: EmbeddingDrift(THREE, batch_size=-1), "EmbeddingDrift: batch_size must be a positive integer"),
        (lambda: HeldOutDocDrift(num_texts=0), "held_out_texts: num_texts must be an integer >= 3"),
        (lambda: held_out_texts(2), "held_out_texts: num_texts must be an integer >= 3"),
        (lambda: held_out_texts(8, min_chars=50, max_chars=10), "need 1 <= min_chars <= max_chars"),
        (lambda: make_uuid_pairs(0), "make_uuid_pairs: num_pairs must be a positive integer, got 0"),
    ],
)
def test_probes_without_items_or_with_identical_texts_are_named_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_identical_embeddings_give_no_meaningless_baseline():
    """Texts the tokenizer cuts to the same tokens embed identically: an error, not a baseline of 0."""
    same = torch.ones(4, 8)
    with pytest.raises(ValueError, match="pairwise similarities are all equal"):
        drift_metrics(same, same)
    ref = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert drift_metrics(ref, ref)["embed_spearman"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, r"every=...\) must be a positive integer.*got 0"),
        ({"every": -5}, r"every=...\) must be a positive integer.*got -5"),
        ({"every": 2.5}, r"every=...\) must be a positive integer"),
        ({"every": True}, r"every=...\) must be a positive integer"),
        ({"every": 5, "optimizer_reset": "zero"}, r"optimizer_reset=...\) must be 'reset' or 'prune', got 'zero'"),
        ({"every": 5, "prune_ratio": 0}, r"prune_ratio=...\) must be in \(0, 1\), got 0"),
        ({"every": 5, "prune_ratio": 1}, r"prune_ratio=...\) must be in \(0, 1\), got 1"),
        ({"every": 5, "prune_ratio": 1.5}, r"prune_ratio=...\) must be in \(0, 1\)"),
        ({"every": 5, "prune_ratio": math.nan}, r"prune_ratio=...\) must be in \(0, 1\)"),
        ({"every": 5, "seed": "1"}, r"seed=...\) must be an integer"),
        ({"every": 5, "track_cumulative": "yes"}, r"track_cumulative=...\) must be true or false, got 'yes'"),
    ],
)
def test_merge_restart_settings_are_named_errors(kwargs, match):
    with pytest.raises(RestartError, match=f"MergeRestart\\({match}"):
        MergeRestart(**kwargs)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"total_steps": 0}, r"warmup_steps \(0\) must be shorter than total_steps \(0\)"),
        ({"total_steps": 10, "warmup_steps": 10}, r"warmup_steps \(10\) must be shorter than total_steps \(10\)"),
        ({"total_steps": -1}, "total_steps must be a non-negative integer"),
        ({"total_steps": 10, "restart_every": 0}, "restart_every must be a positive integer or None"),
        ({"total_steps": 10, "restart_every": 4, "restart_warmup_steps": 4}, "must be shorter than restart_every"),
        ({"total_steps": 10, "min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\]"),
        ({"total_steps": 10, "min_lr_ratio": math.nan}, r"min_lr_ratio must be in \[0, 1\]"),
    ],
)
def test_jagged_schedule_settings_are_named_errors(args, match):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(RestartError, match=match):
        JaggedCosineLR(optimizer, **args)


# == class 7: readers and names ====================================================================


@pytest.fixture
def comparison_csv(tmp_path) -> Path:
    records = [
        VariantRecord("a", "ok", None, {"val_acc": 0.5}, 4096, 0.01, 100.0, "runs/a", {"lr": 0.1}, wall_time_s=3.0),
        VariantRecord("b", "failed", "boom", {"val_acc": math.nan}, 0, math.nan, math.nan, "runs/b"),
    ]
    return write_comparison(tmp_path, records)


def edit_cell(path: Path, row: int, column: str, value: str | None) -> None:
    """Set (or, with `value=None`, delete the column of) one cell, as a spreadsheet would save it."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if value is None:
        for r in rows:
            del r[column]
    else:
        rows[row][column] = value
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_the_comparison_file_round_trips(comparison_csv):
    a, b = read_comparison(comparison_csv)
    assert (a.trainable_params, a.metrics, a.overrides, a.wall_time_s) == (4096, {"val_acc": 0.5}, {"lr": 0.1}, 3.0)
    assert b.status == "failed" and math.isnan(b.step_time_median_s) and b.metrics == {}
    bom = comparison_csv.with_name("bom.csv")
    bom.write_bytes(b"\xef\xbb\xbf" + comparison_csv.read_bytes())  # as a spreadsheet saves UTF-8 CSV
    assert [r.name for r in read_comparison(bom)] == ["a", "b"]


@pytest.mark.parametrize(
    ("row", "column", "value", "match"),
    [
        (
            0,
            "trainable_params",
            "4,096",
            r"line 2, column 'trainable_params': '4,096' is not a whole number.*separators",
        ),
        (0, "trainable_params", "n/a", r"line 2, column 'trainable_params': 'n/a' is not a whole number"),
        (1, "val_acc", "n/a", r"line 3, column 'val_acc': 'n/a' is not a number"),
        (0, "peak_memory_mb", "1,5", r"line 2, column 'peak_memory_mb': '1,5' is not a number"),
        (1, "status", "done", r"line 3, column 'status': 'done' is not one of \['ok', 'failed'\]"),
        (0, "overrides", "{lr: 0.1}", r"line 2, column 'overrides': '\{lr: 0.1\}' is not a JSON mapping"),
        (0, "overrides", "[1]", r"line 2, column 'overrides': '\[1\]' is not a JSON mapping"),
        (1, "name", "", r"line 3, column 'name': empty"),
        (0, "status", None, r"column\(s\) \['status'\] missing"),
        (0, "trainable_params", None, r"column\(s\) \['trainable_params'\] missing"),
    ],
)
def test_a_hand_edited_comparison_names_file_line_and_column(comparison_csv, row, column, value, match):
    edit_cell(comparison_csv, row, column, value)
    before = comparison_csv.read_bytes()
    with pytest.raises(CompareError, match=f"{comparison_csv}(: |, ){match}"):
        read_comparison(comparison_csv)
    assert comparison_csv.read_bytes() == before


def test_an_unquoted_thousands_separator_is_an_extra_cell(comparison_csv):
    lines = comparison_csv.read_text().splitlines()
    lines[1] = lines[1].replace(",4096,", ",4,096,")
    comparison_csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(CompareError, match=f"{comparison_csv}, line 2: 1 cell\\(s\\) more than the header"):
        read_comparison(comparison_csv)


def test_a_comparison_file_that_is_not_utf8_is_named(comparison_csv):
    comparison_csv.write_bytes(comparison_csv.read_bytes().replace(b"runs/a", b"runs/\xff"))
    with pytest.raises(CompareError, match=f"{comparison_csv}: not UTF-8 text"):
        read_comparison(comparison_csv)


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["comparison.csv"], "variant 0: name 'comparison.csv' must not end in .csv"),
        (["chosen_policy.YAML"], "must not end in .csv, .png, .yaml"),
        (["a\n"], r"variant 0: name 'a\\n' must start with a letter or digit"),
        (["ok", "x" * 256], "variant 1: name 'x{256}' is 256 bytes long; a folder name holds at most 255"),
        (["CON"], r"variant 0: name 'CON' is a device name Windows reserves \(CON\)"),
        (["nul.txt"], r"is a device name Windows reserves \(NUL\)"),
        (["com1"], r"is a device name Windows reserves \(COM1\)"),
        (["run."], "must not end with '.'"),
        (["lora", "LoRA"], "variant 1: name 'LoRA' differs from 'lora' only in case \\(also variant 0\\)"),
        (["lora", "lora"], "variant 1: duplicate name 'lora'"),
        (["../up"], "it names a directory"),
        (["é"], "must start with a letter or digit"),
    ],
)
def test_variant_names_that_cannot_be_folders_are_refused(names, match):
    with pytest.raises(CompareError, match=match):
        parse_variants([{"name": n, "policy": "lora_all"} for n in names])


def test_a_variant_named_like_a_comparison_file_fails_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(compare_module, "run_variant", lambda *a, **k: pytest.fail("a variant ran"))
    config = write_config(tmp_path, adapters={"policy": "lora_all"})
    with pytest.raises(CompareError, match="comparison.csv"):
        run_comparison(config, [{"name": "comparison.csv", "policy": "lora_all"}], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    fine = [255 * "x", "r8-qv", "lora=8+dora", "v1.2", "Comparison"]
    assert [v.name for v in parse_variants([{"name": n, "policy": "lora_all"} for n in fine])] == fine


@pytest.mark.parametrize(
    ("widen", "match"),
    [
        (["qv", {"my set": ["mlp.*"]}], r"widening step 'my set': its variants' names \('r4-my set'\) must start"),
        (["qv", {"mlp.csv": ["mlp.*"]}], r"widening step 'mlp.csv'.*must not end in .csv"),
        (["qv", {"QV": ["mlp.*"]}], r"widening steps repeat a name \(case-insensitively\): \['qv', 'QV'\]"),
        (["qv", {"x" * 253: ["mlp.*"]}], "bytes long; a folder name holds at most 255"),
    ],
)
def test_every_widening_step_is_named_before_the_sweep_trains(widen, match):
    with pytest.raises(RankSearchError, match=match):
        SearchSettings(metric="val_acc", ranks=[1, 4], widen=widen)


def test_rank_search_resolves_every_rank_on_every_step_before_the_first_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_search_module, "run_comparison", lambda *a, **k: pytest.fail("a variant ran"))
    config = write_config(tmp_path, adapters={"policy": "lora_all"})
    settings = SearchSettings(metric="val_acc", ranks=[1, 2, 512], widen=["qv", "all_linear"])
    with pytest.raises(RankSearchError, match="widening step 'qv' at rank 512: .*more than 4x the layer"):
        run_rank_search(config, settings, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RankSearchError, match="`method`: .*no_such_method"):
        SearchSettings(metric="val_acc", method="no_such_method")


# == issue 21: YAML read as written on every experiment route ========================================

RANGE_POLICY = (
    "rules:\n  - {method: none, modules: ['*'], depth: {indices: [2:4]}}\n  - {method: lora, modules: ['*']}\n"
)


def test_a_run_config_is_read_as_fit_reads_it(tmp_path):
    config = write_config(tmp_path)
    config.write_text(
        config.read_text() + "adapters:\n  policy:\n" + "".join(f"    {line}\n" for line in RANGE_POLICY.splitlines())
    )
    cfg = load_config(config)
    assert cfg["adapters"]["policy"]["rules"][0]["depth"] == {"indices": ["2:4"]}  # YAML 1.1 read 124
    assert carried_rules(cfg)[0]["depth"] == {"indices": ["2:4"]}
    config.write_text(config.read_text() + "trainer: {}\n")
    with pytest.raises(CompareError, match=f"{config}: duplicate key 'trainer'"):
        load_config(config)


def test_the_experiment_commands_read_their_yaml_as_fit_does(tmp_path, monkeypatch):
    seen = {}

    def capture(key, error):
        def fake(*args, **kwargs):
            seen[key] = args
            raise error("captured")

        return fake

    monkeypatch.setattr(compare_module, "run_comparison", capture("compare", CompareError))
    monkeypatch.setattr(rank_search_module, "run_rank_search", capture("rank_search", RankSearchError))
    monkeypatch.setattr(suggest_module, "suggest", capture("suggest", SuggestError))
    spec = tmp_path / "spec.yaml"
    policy = "{rules: [{method: lora, modules: ['*'], depth: {indices: [2:4]}}]}"
    spec.write_text(f"base: base.yaml\nvariants:\n  - {{name: v, policy: {policy}}}\n")
    assert _cli_exit(["compare", "--config", str(spec)]) == 2
    assert seen["compare"][1][0]["policy"]["rules"][0]["depth"] == {"indices": ["2:4"]}
    spec.write_text("base: base.yaml\nsearch: {metric: val_acc, ranks: [1, 010]}\n")  # YAML 1.1: 010 is 8
    assert _cli_exit(["compare", "rank-search", "--config", str(spec)]) == 2
    assert seen["rank_search"][1].ranks == [1, 10]
    spec.write_text("base: base.yaml\nsettings: {budget: 010}\n")
    assert _cli_exit(["suggest", "--config", str(spec)]) == 2
    assert seen["suggest"][2].budget == 10


def _cli_exit(argv: list[str]) -> int:
    """The `lightning-peft` command's exit status for `argv` (0 when it returns)."""
    from lightning_peft.cli.main import main

    try:
        main(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    return 0
