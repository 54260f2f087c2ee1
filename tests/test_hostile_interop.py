"""Hostile input for export, import and inspect (docs/hostile_input.md): each class at its root.

Every refusal names the file and field (or the path and the rule) at fault, and leaves the
model, the files and the folders as they were.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import model_out, randomize_adapters, tiny_llama, tokens
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from lightning_peft import find_adapters, get_plan, inject_adapters
from lightning_peft.core.io import UnsafeWriteError, check_replaceable, replace_dir_safely
from lightning_peft.experiments.records import COMPARISON_FILE, write_comparison
from lightning_peft.interop.export import (
    ExportError,
    diagnose_peft,
    export_checkpoint,
    export_merged,
    export_peft,
    import_peft,
    load_peft_export,
)
from lightning_peft.interop.manifest import MANIFEST_FILE
from lightning_peft.interop.patterns import PatternError, pattern_value
from lightning_peft.interop.peft_format import PeftFormatError

RTOL = 1e-5
MIXED = {  # four flag sets -> four peft adapters in subfolders
    "rules": [
        {"method": "lora", "modules": ["q_proj", "v_proj"], "hparams": {"r": 4, "alpha": 8}},
        {"method": "lora", "modules": ["o_proj"], "hparams": {"r": 2, "alpha": 3, "use_rslora": True}},
        {"method": "dora", "modules": ["mlp.*"], "depth": {"inner": 1}, "hparams": {"r": 3, "alpha": 5}},
        {"method": "lora", "modules": ["k_proj"], "hparams": {"r": 2, "dropout": 0.1}},  # a name without "."
    ]
}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def adapted(plan=MIXED, seed: int = 0) -> torch.nn.Module:
    model = tiny_llama(seed)
    inject_adapters(model, plan)
    randomize_adapters(model)
    return model.eval()  # new adapter layers start in training mode: dropout off for output comparisons


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: the proof that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def peft_folder(tmp_path) -> Path:
    """A peft LoRA adapter with rank and alpha patterns, saved by peft."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 3})
    get_peft_model(tiny_llama(0), config).save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def edit_config(folder: Path, **fields) -> Path:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return path


def assert_refused(call, error, *culprits: str) -> None:
    with pytest.raises(error) as info:
        call()
    for culprit in culprits:
        assert culprit in str(info.value), (culprit, str(info.value))


def assert_untouched(model: torch.nn.Module) -> None:
    assert get_plan(model) is None and not find_adapters(model)


# -- 1. patterns from files: bounded cost, named errors, peft's semantics ------------------------


def test_a_catastrophic_pattern_is_refused_in_bounded_time_naming_file_and_field(peft_folder):
    path = edit_config(peft_folder, alpha_pattern={r"(([a-z_.]|[a-z_.])+)+\d": 3})  # exponential backtracking
    model = tiny_llama(0)
    assert_refused(lambda: import_peft(model, peft_folder), PeftFormatError, str(path), "alpha_pattern", "took over")
    assert_untouched(model)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern", "target_modules"])
def test_an_invalid_regex_is_a_named_error(peft_folder, field):
    path = edit_config(peft_folder, **{field: "q_proj(" if field == "target_modules" else {"q_proj(": 2}})
    model = tiny_llama(0)
    assert_refused(lambda: import_peft(model, peft_folder), PeftFormatError, str(path), field, "not a valid regex")
    assert_untouched(model)


def test_valid_patterns_match_as_peft_does():
    from peft.utils.other import get_pattern_key

    patterns = {"v_proj": 1, r"layers\.1\.self_attn\.q_proj": 2, "mlp.*": 3, "proj": 4, r"\d\.self_attn\.k_proj": 5}
    names = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")]
    names += ["model.layers.0.self_attn.v_proj", "v_proj", "proj"]
    for name in names:
        key = get_pattern_key(list(patterns), name)
        assert pattern_value(patterns, name, None) == patterns.get(key), name
    with pytest.raises(PatternError, match="not a valid regex"):
        pattern_value({"[": 1}, "q_proj", None, "cfg.json: rank_pattern")


def test_a_rank_pattern_that_disagrees_with_the_weights_is_named(peft_folder):
    path = edit_config(peft_folder, rank_pattern={"q_proj": 6})  # the stored q_proj factors have rank 4
    model = tiny_llama(0)
    assert_refused(lambda: import_peft(model, peft_folder), PeftFormatError, str(peft_folder), "lora_A", "shape")
    assert path.is_file()
    assert_untouched(model)


# -- 2. paths from files: everything a manifest names stays inside its folder ---------------------


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_manifest_names_that_leave_the_folder_are_refused(tmp_path, kind):
    export_peft(adapted(), tmp_path / "export")
    outside = tmp_path / "elsewhere"
    export_peft(adapted(seed=1), outside)  # a real adapter the manifest must not reach
    manifest_path = tmp_path / "export" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    first = next(iter(manifest["adapters"]))
    name = {"absolute": str(outside / "dora"), "dotdot": "../elsewhere/dora", "symlink": "link"}[kind]
    if kind == "symlink":
        (tmp_path / "export" / "link").symlink_to(outside / "dora", target_is_directory=True)
    manifest["adapters"] = {name: manifest["adapters"][first]}
    manifest_path.write_text(json.dumps(manifest))
    model = tiny_llama(0)
    for call in (lambda: import_peft(model, tmp_path / "export"), lambda: load_peft_export(model, tmp_path / "export")):
        assert_refused(call, PeftFormatError, str(manifest_path), "adapters", repr(name))
    assert_untouched(model)
    assert not any("lora" in n for n, _ in model.named_modules())  # peft did not wrap it either


def test_a_symlinked_adapter_subfolder_leading_outside_is_refused(tmp_path, peft_folder):
    folder = tmp_path / "multi"
    folder.mkdir()
    (folder / "other").symlink_to(peft_folder, target_is_directory=True)
    model = tiny_llama(0)
    assert_refused(lambda: import_peft(model, folder), PeftFormatError, "'other'", "leads outside")
    assert_untouched(model)


# -- 3. writes: replace only what we wrote, never the source, never the working directory -------


def test_overwrite_never_replaces_a_folder_we_did_not_write(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (checkout / "notes.md").write_text("mine")
    before = files(checkout)
    model = adapted()
    for call in (
        lambda: export_peft(model, checkout, overwrite=True),
        lambda: export_merged(model, checkout, overwrite=True),
    ):
        assert_refused(call, ExportError, str(checkout), "not written by lightning-peft", MANIFEST_FILE)
    assert files(checkout) == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkout"]


def test_export_never_writes_over_its_own_checkpoint(tmp_path):
    run = tmp_path / "run"
    export_peft(adapted(), run)  # even a folder we wrote once: it now holds the source
    (run / "last.ckpt").write_bytes(b"checkpoint")
    (run / "config.yaml").write_text("model: {}\n")
    before = files(run)
    assert_refused(
        lambda: export_checkpoint(tiny_llama(0), run / "last.ckpt", run, overwrite=True),
        ExportError,
        str(run),
        "last.ckpt",
        "source",
    )
    assert_refused(
        lambda: export_peft(adapted(), run, overwrite=True, protected=[run / "config.yaml"]),
        ExportError,
        "config.yaml",
    )
    assert files(run) == before


def test_the_working_directory_is_never_replaced(tmp_path, monkeypatch):
    export_peft(adapted(), tmp_path / "export")
    before = files(tmp_path)
    monkeypatch.chdir(tmp_path / "export")
    assert_refused(lambda: export_peft(adapted(), ".", overwrite=True), ExportError, "working directory")
    monkeypatch.chdir(tmp_path)
    assert_refused(lambda: export_peft(adapted(), tmp_path, overwrite=True), ExportError, "working directory")
    assert files(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_symlinked_target_is_refused_and_left_alone(tmp_path):
    export_peft(adapted(), tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    before = files(tmp_path / "real")
    assert_refused(lambda: export_peft(adapted(), tmp_path / "link", overwrite=True), ExportError, "symlink")
    assert (tmp_path / "link").is_symlink() and files(tmp_path / "real") == before


def test_a_writer_that_forgets_its_marker_replaces_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="marker"), replace_dir_safely(target, "MARK") as tmp:
        (tmp / "data").write_text("x")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(UnsafeWriteError, match="not written by lightning-peft"):
        check_replaceable(tmp_path / "f", "MARK")
    (tmp_path / "MARK").write_text("")  # a file of ours, but a folder is asked for
    with (
        pytest.raises(UnsafeWriteError, match="not a folder"),
        replace_dir_safely(tmp_path / "f", "MARK", overwrite=True),
    ):
        pass
    assert (tmp_path / "f").read_text() == "x"


def test_compare_never_overwrites_a_comparison_csv_it_did_not_write(tmp_path):
    foreign = tmp_path / COMPARISON_FILE
    foreign.write_text("hand,made\n1,2\n")
    assert_refused(lambda: write_comparison(tmp_path, []), UnsafeWriteError, COMPARISON_FILE, "not written")
    assert foreign.read_text() == "hand,made\n1,2\n"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    write_comparison(fresh, [])
    write_comparison(fresh, [])  # its own file: replaced
    check_replaceable(fresh / COMPARISON_FILE, ".lightning-peft-comparison")


# -- 4. one validator for tensors and config fields on every route ----------------------------


def test_import_refuses_nan_weights_naming_file_and_tensor(peft_folder):
    path = peft_folder / "adapter_model.safetensors"
    state = load_file(path)
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, path)
    model = tiny_llama(0)
    assert_refused(lambda: import_peft(model, peft_folder), PeftFormatError, str(peft_folder), "lora_B", "NaN")
    assert_untouched(model)


@pytest.mark.parametrize(
    ("field", "value"), [("use_rslora", "false"), ("use_dora", "true"), ("lora_dropout", "0.1"), ("r", 4.5)]
)
def test_import_refuses_mistyped_config_fields(peft_folder, field, value):
    path = edit_config(peft_folder, **{field: value})
    model = tiny_llama(0)
    assert_refused(lambda: import_peft(model, peft_folder), PeftFormatError, str(path), field)
    assert_untouched(model)


def test_export_merged_refuses_an_fp16_overflow_and_writes_nothing(tmp_path):
    model = tiny_llama(0).half()
    inject_adapters(model, {"rules": [{"method": "lora", "modules": ["q_proj"], "hparams": {"r": 2, "alpha": 2}}]})
    with torch.no_grad():
        _, layer = find_adapters(model)[0]
        layer.adapter.lora_A.fill_(300.0)
        layer.adapter.lora_B.fill_(300.0)  # 2 * 300 * 300 = 180000: finite in fp32, inf in fp16
    assert_refused(lambda: export_merged(model, tmp_path / "merged"), ExportError, "q_proj", "non-finite", "float16")
    assert list(tmp_path.iterdir()) == []


# -- 8. import as complete as export, snippets that run, exports peft loads quietly -------------


def test_import_reads_back_a_mixed_export(tmp_path):
    model = adapted()
    ids = tokens()
    ours = model_out(model, ids)
    export_peft(model, tmp_path / "export")
    again = tiny_llama(0)
    plan = import_peft(again, tmp_path / "export")  # `again` is in eval mode: so are its new layers (dropout off)
    assert {r.method for r in plan.rows} == {"lora", "dora"} and len(plan.rows) == len(get_plan(model).rows)
    peft_out = model_out(load_peft_export(tiny_llama(0), tmp_path / "export").eval(), ids)
    assert rel_diff(model_out(again, ids), peft_out) < RTOL and rel_diff(peft_out, ours) < RTOL


def peft_multi_adapter(tmp_path: Path, second_targets: list[str]) -> tuple[PeftModel, Path]:
    """peft's own multi-adapter save: `default` (LoRA) at the folder, `second` (DoRA) in a subfolder."""
    peft_model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.add_adapter("second", LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=second_targets))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.base_model.set_adapter(["default", "second"])
    peft_model.save_pretrained(tmp_path / "multi")
    return peft_model.eval(), tmp_path / "multi"


def test_import_reads_peft_multi_adapter_saves_with_peft_outputs(tmp_path):
    peft_model, folder = peft_multi_adapter(tmp_path, ["o_proj", "down_proj"])
    assert (folder / "adapter_config.json").is_file() and (folder / "second" / "adapter_config.json").is_file()
    ids = tokens()
    model = tiny_llama(0)
    plan = import_peft(model, folder)
    assert {r.method for r in plan.rows} == {"lora", "dora"}
    assert rel_diff(model_out(model, ids), model_out(peft_model, ids)) < RTOL
    one = PeftModel.from_pretrained(tiny_llama(0), str(folder)).eval()  # the check can fail: one adapter only
    assert rel_diff(model_out(one, ids), model_out(peft_model, ids)) > 1e-3


def test_adapters_that_share_a_module_are_refused(tmp_path):
    _, folder = peft_multi_adapter(tmp_path, ["v_proj"])
    model = tiny_llama(0)
    assert_refused(lambda: import_peft(model, folder), PeftFormatError, "second", "v_proj", "also adapted")
    assert_untouched(model)


def readme_code(folder: Path) -> str:
    text = (folder / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.parametrize("plan", [MIXED, {"rules": [{"method": "dora", "modules": ["q_proj"], "hparams": {"r": 2}}]}])
def test_the_readme_snippet_runs_as_written_and_peft_loads_quietly(tmp_path, monkeypatch, plan):
    model = adapted(plan)
    ids = tokens()
    export_peft(model, tmp_path / "export", save_base=True)
    code = readme_code(tmp_path / "export")
    assert "AutoModelForCausalLM" in code
    monkeypatch.chdir(tmp_path / "export")
    scope: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "README.md", "exec"), scope)  # our own snippet, run as a user would
    assert not [w for w in caught if "should not be contained in the prefix" in str(w.message)]
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert rel_diff(model_out(scope["model"].eval(), ids), model_out(model, ids)) < RTOL


def test_exports_carry_task_type_so_inspect_round_trips(tmp_path):
    export_peft(adapted(), tmp_path / "export", save_base=True)
    configs = [json.loads(p.read_text()) for p in (tmp_path / "export").glob("*/adapter_config.json")]
    assert configs and {c["task_type"] for c in configs} == {"CAUSAL_LM"}
    out = diagnose_peft(tmp_path / "export", tmp_path / "export" / "base", tmp_path / "diag")
    assert Path(out).exists() and os.listdir(tmp_path / "diag")


# -- a method is one file: export and the report ask the method, never its name -------------------


def test_a_new_method_declared_in_one_place_is_refused_by_name_then_converted_and_labelled(tmp_path):
    from torch import nn

    from lightning_peft.adapters import AdapterMethod, method_label, register_adapter

    @register_adapter
    class Shift(AdapterMethod):  # a toy additive method that peft has no tuner for (`peft = None`)
        method = "shift"
        label = "Shift"

        def __init__(self, in_features: int, out_features: int, *, r: int = 2) -> None:
            super().__init__(in_features, out_features)
            self.u = nn.Parameter(torch.randn(out_features, r) * 0.1)
            self.v = nn.Parameter(torch.randn(r, in_features) * 0.1)

        def forward(self, x, base_out, layer):
            return base_out + x @ (self.u @ self.v).t().to(x.dtype)

        def delta_weight(self, weight):
            return (self.u @ self.v).to(weight.dtype)

    model = tiny_llama(0)
    inject_adapters(model, {"rules": [{"method": "shift", "modules": ["q_proj"], "hparams": {"r": 2}}]})
    assert_refused(lambda: export_peft(model, tmp_path / "a"), ExportError, "(shift)", "routes")
    assert not (tmp_path / "a").exists()
    ids = tokens()
    report = export_peft(model, tmp_path / "b", routes={"shift": "svd"}, svd_rank=2)
    assert max(f.rel_error for f in report.converted) < 1e-5  # rank 2 kept exactly, as the low-rank target
    loaded = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "b")).eval()
    assert rel_diff(model_out(loaded, ids), model_out(model.eval(), ids)) < RTOL
    assert method_label("shift") == "Shift" and method_label("full") == "full"
