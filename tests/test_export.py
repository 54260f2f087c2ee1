"""Export to HF peft and transformers, import from peft: round trips against the real libraries (fp32)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import CausalLMModule, model_out, randomize_adapters, tiny_bert, tiny_llama, token_loader, tokens, trainer
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from lightning_peft import AdapterCallback, find_adapters, get_plan, inject_adapters, merge_adapters
from lightning_peft.interop.export import (
    MANIFEST_FILE,
    ExportError,
    ExportReport,
    LayerFidelity,
    export_merged,
    export_peft,
    load_peft_export,
    svd_factors,
)

RTOL = 1e-5

LORA_RANKS = {  # per-layer ranks and alphas: one LoraConfig with rank_pattern / alpha_pattern
    "rules": [
        {"method": "lora", "modules": ["q_proj", "v_proj"], "hparams": {"r": 4, "alpha": 8, "dropout": 0.1}},
        {"method": "lora", "modules": ["mlp.*"], "depth": {"last": 2}, "hparams": {"r": 2, "alpha": 3, "dropout": 0.1}},
    ]
}
DORA_RANKS = {
    "rules": [
        {"method": "dora", "modules": ["self_attn.*"], "depth": {"first": 3}, "hparams": {"r": 4, "alpha": 8}},
        {"method": "dora", "modules": ["down_proj"], "hparams": {"r": 6, "alpha": 4}},
    ]
}
RSLORA = {
    "rules": [
        {"method": "lora", "modules": ["q_proj"], "hparams": {"r": 4, "alpha": 2, "use_rslora": True}},
        {"method": "lora", "modules": ["k_proj"], "hparams": {"r": 8, "alpha": 3, "use_rslora": True}},
    ]
}
MIXED = {  # LoRA, rsLoRA and DoRA in one plan: three flag sets, three peft adapters on disjoint modules
    "rules": [
        {"method": "lora", "modules": ["q_proj", "v_proj"], "depth": {"first": 2}, "hparams": {"r": 4, "alpha": 8}},
        {"method": "lora", "modules": ["o_proj"], "hparams": {"r": 2, "alpha": 3, "use_rslora": True}},
        {"method": "dora", "modules": ["mlp.*"], "depth": {"inner": 1}, "hparams": {"r": 3, "alpha": 5}},
    ]
}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def fitted(policy, steps: int = 3) -> CausalLMModule:
    """A tiny Llama trained `steps` real optimizer steps under `policy` (adapters non-zero)."""
    module = CausalLMModule(tiny_llama(0), lr=2e-2)
    tr = trainer(max_steps=steps, callbacks=[AdapterCallback(policy, verbose=False)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(module, train_dataloaders=token_loader())
    assert all(float(layer.delta_weight().abs().max()) > 0 for _, layer in find_adapters(module))
    return module.eval()


@pytest.mark.parametrize("policy", [LORA_RANKS, DORA_RANKS, RSLORA], ids=["lora-ranks", "dora-ranks", "rslora"])
def test_trained_adapters_load_in_peft_from_pretrained(tmp_path, policy):
    module = fitted(policy)
    ids = tokens()
    ours = model_out(module.model, ids)
    report = export_peft(module, tmp_path / "adapter")  # the LightningModule: its `model.` prefix is dropped
    assert list(report.adapters) == ["."] and report.prefix == "model."
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] == (policy is DORA_RANKS) and config["use_rslora"] == (policy is RSLORA)
    assert (config["rank_pattern"] or config["alpha_pattern"]) and config["lora_dropout"] == (
        0.1 if policy is LORA_RANKS else 0.0
    )
    peft_model = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "adapter")).eval()
    assert rel_diff(model_out(peft_model, ids), ours) < RTOL
    loaded = dict(peft_model.named_modules())
    for row in get_plan(module).rows:  # every layer got its own rank and scaling
        layer = loaded["base_model.model." + row.name.removeprefix("model.")]
        r = row.hparams["r"]
        assert layer.r["default"] == r and layer.scaling["default"] == pytest.approx(
            row.hparams["alpha"] / (r**0.5 if row.hparams.get("use_rslora") else r)
        )


def test_mixed_lora_dora_plan_loads_as_disjoint_peft_adapters(tmp_path):
    module = fitted(MIXED)
    ids = tokens()
    ours = model_out(module.model, ids)
    report = export_peft(module, tmp_path / "adapter")
    assert set(report.adapters) == {"lora_adapter", "lora_rslora", "dora"}  # not `lora`: peft warns on it
    assert not (tmp_path / "adapter" / "adapter_config.json").exists()  # a partial load cannot happen silently
    # The documented peft recipe (also written to the folder's README.md), without our helper:
    adapter = str(tmp_path / "adapter" / "lora_adapter")
    peft_model = PeftModel.from_pretrained(tiny_llama(0), adapter, adapter_name="lora_adapter")
    peft_model.load_adapter(str(tmp_path / "adapter" / "lora_rslora"), adapter_name="lora_rslora")
    peft_model.load_adapter(str(tmp_path / "adapter" / "dora"), adapter_name="dora")
    peft_model.base_model.set_adapter(["lora_adapter", "lora_rslora", "dora"])
    assert rel_diff(model_out(peft_model.eval(), ids), ours) < RTOL
    assert rel_diff(model_out(load_peft_export(tiny_llama(0), tmp_path / "adapter").eval(), ids), ours) < RTOL
    one_only = PeftModel.from_pretrained(tiny_llama(0), adapter).eval()
    assert rel_diff(model_out(one_only, ids), ours) > 1e-3  # the check can fail: one adapter is not the plan


def test_merged_export_loads_with_auto_model_for_causal_lm(tmp_path):
    policy = {
        "rules": [
            {"method": "mora", "modules": ["mlp.*"], "depth": {"outer": 1}, "hparams": {"r": 4}},
            {"method": "dora", "modules": ["*_proj"], "depth": {"inner": 1}, "hparams": {"r": 4}},
            {"method": "full", "modules": ["lm_head"]},
        ]
    }
    module = fitted(policy)
    ids = tokens()
    ours = model_out(module.model, ids)
    export_merged(module, tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert rel_diff(model_out(loaded, ids), ours) < RTOL
    keys = load_file(tmp_path / "merged" / "model.safetensors")
    assert not [k for k in keys if ".adapter." in k or ".base." in k]  # plain Linear layers, no wrappers
    assert torch.equal(model_out(module.model, ids), ours) and not any(
        layer.merged for _, layer in find_adapters(module)
    )


def test_merged_export_of_bert_loads_with_auto_model(tmp_path):
    model = tiny_bert(0)
    inject_adapters(model, {"rules": [{"method": "lora", "modules": ["query", "value"], "hparams": {"r": 4}}]})
    randomize_adapters(model)
    ids = tokens()
    ours = model_out(model, ids)
    export_merged(model, tmp_path / "bert")
    assert rel_diff(model_out(AutoModel.from_pretrained(tmp_path / "bert").eval(), ids), ours) < RTOL
    merge_adapters(model)  # an already merged model exports as is: same weights
    export_merged(model, tmp_path / "bert2")
    assert rel_diff(model_out(AutoModel.from_pretrained(tmp_path / "bert2").eval(), ids), ours) < RTOL


def mora_model():
    model = tiny_llama(0)
    policy = {
        "rules": [
            {"method": "mora", "modules": ["mlp.*"], "depth": {"first": 1}, "hparams": {"r": 4}},
            {"method": "lora", "modules": ["q_proj"], "hparams": {"r": 4}},
        ]
    }
    inject_adapters(model, policy)
    randomize_adapters(model, scale=0.05)
    return model


def test_mora_to_lora_at_full_rank_is_exact_to_rounding(tmp_path):
    model = mora_model()
    ids = tokens()
    ours = model_out(model, ids)
    report = export_peft(model, tmp_path / "out", routes={"mora": "svd"}, svd_energy=1.0, probe=ids)
    assert len(report.converted) == 3
    for f in report.converted:
        assert f.rank == f.full_rank == 32 and f.rel_error < 1e-6 and f.energy == pytest.approx(1.0)
    assert report.max_logit_diff < 1e-5 * float(ours.abs().max())
    assert not (tmp_path / "out" / "base").exists()
    peft_model = PeftModel.from_pretrained(
        tiny_llama(0),
        str(tmp_path / "out"),  # `svd` leaves the base as it was: none is written
    )
    assert rel_diff(model_out(peft_model.eval(), ids), ours) < RTOL


def test_svd_report_numbers_match_a_direct_computation(tmp_path):
    model = mora_model()
    ids = tokens()
    ours = model_out(model, ids)
    report = export_peft(model, tmp_path / "out", routes={"mora": "svd"}, svd_rank=5, probe=ids)
    layers = dict(find_adapters(model))
    for f in report.converted:
        s = torch.linalg.svdvals(layers[f.module].delta_weight().double())
        assert f.rank == 5
        assert f.energy == pytest.approx(float(s[:5].square().sum() / s.square().sum()), rel=1e-9)
        assert f.rel_error == pytest.approx(float(s[5:].square().sum().sqrt() / s.square().sum().sqrt()), rel=1e-6)
        assert f.rel_error > 1e-3  # rank 5 of 32 loses something
    # The reported logit difference is what peft gives when it loads the converted adapter.
    peft_model = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "out"))
    direct = float((model_out(peft_model.eval(), ids) - ours).abs().max())
    assert report.max_logit_diff == pytest.approx(direct, rel=1e-3, abs=1e-6) and direct > 0
    # Per layer: this layer alone converted, by hand (a plain Linear holding W0 + B A in a copy).
    first = report.converted[0]
    state = load_file(tmp_path / "out" / "adapter_model.safetensors")
    key = "base_model.model." + first.module
    single = copy.deepcopy(model)
    layer = dict(find_adapters(single))[first.module]
    with torch.no_grad():
        layer.base.weight.add_(state[key + ".lora_B.weight"] @ state[key + ".lora_A.weight"])
    parent, _, child = first.module.rpartition(".")
    setattr(single.get_submodule(parent), child, layer.base)
    direct = float((model_out(single, ids) - ours).abs().max())
    assert first.max_logit_diff == pytest.approx(direct, rel=1e-3, abs=1e-6) and direct > 0


def test_svd_factors_energy_threshold_picks_the_smallest_rank():
    u, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    s = torch.tensor([4.0, 2.0, 1.0] + [0.1] * 9, dtype=torch.float64)
    delta = (u[:, :12] * s) @ v.t()
    b, a, kept, full = svd_factors(delta, rank=None, energy=0.99)
    assert a.shape == (3, 12) and b.shape == (20, 3) and full == 12
    assert kept == pytest.approx(21 / 21.09)
    assert torch.allclose((b @ a).double(), (u[:, :3] * s[:3]) @ v[:, :3].t(), atol=1e-6)
    # energies of ranks 1, 2, 3, ..., 12: 16/21.09 = 0.759, 20/21.09 = 0.948, 21/21.09 = 0.996, ..., 1
    for energy, rank in ((0.7, 1), (0.9, 2), (0.95, 3), (0.999, 10), (1.0, 12)):
        assert svd_factors(delta, rank=None, energy=energy)[1].shape[0] == rank, energy
    assert svd_factors(delta, rank=50, energy=None)[1].shape[0] == 12  # capped at the full rank


# -- import from peft -------------------------------------------------------------------------


def peft_adapter(tmp_path: Path, **config) -> tuple[torch.nn.Module, Path]:
    """A peft adapter trained elsewhere: get_peft_model + random B (peft starts B at zero) + save_pretrained."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(0), LoraConfig(**config))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    return peft_model.eval(), tmp_path / "peft"


PEFT_CONFIGS = {
    "lora-patterns": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"down_proj": 2, "layers.1.self_attn.q_proj": 6},
        "alpha_pattern": {"v_proj": 3},
    },
    "dora-rslora": {
        "r": 4,
        "lora_alpha": 5,
        "target_modules": ["k_proj", "o_proj"],
        "use_dora": True,
        "use_rslora": True,
    },
}


@pytest.mark.parametrize("config", PEFT_CONFIGS.values(), ids=PEFT_CONFIGS.keys())
def test_import_peft_adapter_gives_peft_outputs(tmp_path, config):
    from lightning_peft.interop.export import import_peft

    peft_model, folder = peft_adapter(tmp_path, **config)
    ids = tokens()
    model = tiny_llama(0)
    plan = import_peft(model, folder)
    assert rel_diff(model_out(model, ids), model_out(peft_model, ids)) < RTOL
    ranks = {r.name: r.hparams["r"] for r in plan.rows}
    if "rank_pattern" in config:
        assert ranks["model.layers.1.self_attn.q_proj"] == 6 and ranks["model.layers.0.mlp.down_proj"] == 2
    assert {r.method for r in plan.rows} == {"dora" if config.get("use_dora") else "lora"}
    # ... and it exports back to the same peft adapter
    export_peft(model, tmp_path / "again")
    again = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "again")).eval()
    assert rel_diff(model_out(again, ids), model_out(peft_model, ids)) < RTOL


def test_imported_peft_adapter_trains_on_under_a_lightning_module(tmp_path):
    from lightning_peft.interop.export import import_peft, peft_policy

    peft_model, folder = peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    module = CausalLMModule(tiny_llama(0), lr=1e-2)
    plan = import_peft(module, folder)  # the module's `model.` prefix is added
    assert all(r.name.startswith("model.model.layers.") for r in plan.rows)
    ids = tokens()
    assert rel_diff(model_out(module.model.eval(), ids), model_out(peft_model, ids)) < RTOL
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=2, callbacks=[AdapterCallback(peft_policy(folder, "model."), verbose=False)]).fit(
            module.train(), token_loader()
        )
    changed = [n for n, p in module.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert set(changed) == set(before) and len(before) == 4 * 6  # A and B of q and v in 6 blocks


def test_diagnostics_measure_an_imported_peft_adapter(tmp_path):
    from lightning_peft.diagnostics import build_probes
    from lightning_peft.interop.export import import_peft

    peft_model, folder = peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    model = tiny_llama(0)
    import_peft(model, folder)
    probes = {p.name: p for p in build_probes(model, snapshot=False)}
    name = "model.layers.2.self_attn.q_proj"
    values = probes[name].measure(lambda *a: None)
    layer = peft_model.get_submodule("base_model.model." + name)
    w0 = layer.base_layer.weight.double()
    dw = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double() * layer.scaling["default"]
    assert float(values["rel_norm"]) == pytest.approx(float(dw.norm() / w0.norm()), rel=1e-4)


# -- bad input: named errors, nothing written, nothing changed ---------------------------------


def test_unsupported_peft_types_are_named_errors(tmp_path):
    from peft import IA3Config, LoHaConfig, get_peft_model

    from lightning_peft.interop.export import import_peft
    from lightning_peft.interop.peft_format import PeftFormatError

    for name, config in {
        "LOHA": LoHaConfig(r=4, target_modules=["q_proj"]),
        "IA3": IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }.items():
        get_peft_model(tiny_llama(0), config).save_pretrained(tmp_path / name)
        model = tiny_llama(0)
        with pytest.raises(PeftFormatError, match=f"peft_type '{name}' is not supported"):
            import_peft(model, tmp_path / name)
        assert get_plan(model) is None and not find_adapters(model)


def test_bad_exports_are_named_errors_and_write_nothing(tmp_path):
    model = mora_model()
    target = tmp_path / "out"
    with pytest.raises(ExportError, match=r"model\.layers\.0\.mlp\.gate_proj \(mora\)"):
        export_peft(model, target)  # MoRA without a route
    with pytest.raises(ExportError, match="exactly one of (--)?svd_rank"):
        export_peft(model, target, routes={"mora": "svd"})
    merge_adapters(model)
    with pytest.raises(ExportError, match="merged"):
        export_peft(model, target, routes={"mora": "fold"})
    assert sorted(tmp_path.iterdir()) == []  # no target, no temporary folder
    with pytest.raises(ExportError, match="carries no lightning-peft adapters"):
        export_peft(tiny_llama(0), target)
    with pytest.raises(ExportError, match="carries no lightning-peft adapters"):
        export_merged(tiny_llama(0), target)
    assert sorted(tmp_path.iterdir()) == []


def test_non_empty_target_needs_overwrite_and_a_failed_write_leaves_the_old_folder(tmp_path, monkeypatch):
    import lightning_peft.interop.export as export

    model = tiny_llama(0)
    inject_adapters(model, {"rules": [{"method": "lora", "modules": ["q_proj"], "hparams": {"r": 2}}]})
    target = tmp_path / "out"
    export_peft(model, target)  # an earlier export: its manifest proves the folder is ours to replace
    (target / "keep.txt").write_text("mine")
    before = sorted(p.name for p in target.iterdir())
    for call in (lambda: export_peft(model, target), lambda: export_merged(model, target)):
        with pytest.raises(ExportError, match="not empty; pass `--overwrite true`"):
            call()
    assert sorted(p.name for p in target.iterdir()) == before

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_adapter", broken)
    with pytest.raises(OSError, match="disk full"):
        export_peft(model, target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and sorted(p.name for p in target.iterdir()) == before
    with pytest.raises(OSError, match="disk full"):
        export_peft(model, tmp_path / "new" / "deeper" / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the parent folders it made are gone too
    monkeypatch.undo()
    export_peft(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        MANIFEST_FILE,
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_fold_route_writes_mora_and_full_modules_into_the_saved_base(tmp_path):
    model = tiny_llama(0)
    policy = {
        "rules": [
            {"method": "mora", "modules": ["mlp.*"], "depth": {"first": 1}, "hparams": {"r": 4}},
            {"method": "dora", "modules": ["q_proj"], "hparams": {"r": 4}},
            {"method": "full", "modules": ["lm_head"]},
        ]
    }
    inject_adapters(model, policy)
    randomize_adapters(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    ids = tokens()
    ours = model_out(model, ids)
    with pytest.raises(ExportError, match="full.*only|has no low-rank update"):
        export_peft(model, tmp_path / "out", routes={"mora": "svd", "full": "svd"}, svd_rank=2)
    report = export_peft(model, tmp_path / "out", routes={"mora": "fold", "full": "fold"})
    assert report.folded == [r.name for r in get_plan(model).rows if r.method in ("mora", "full")]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
    assert rel_diff(model_out(peft_model, ids), ours) < RTOL
    assert torch.equal(model_out(model, ids), ours)  # the user's model is untouched


# -- module-name prefixes -------------------------------------------------------------------------


def test_adapters_move_between_a_lightning_module_and_its_bare_model(tmp_path):
    from lightning_peft import load_adapters, save_adapters
    from lightning_peft.core.inject import AdapterStateError

    module = CausalLMModule(tiny_llama(0))
    inject_adapters(module, {"rules": [{"method": "dora", "modules": ["q_proj"], "hparams": {"r": 2}}]})
    randomize_adapters(module)
    ids = tokens()
    ours = model_out(module.model.eval(), ids)
    save_adapters(module, tmp_path / "prefixed")
    with pytest.raises(AdapterStateError, match=r"extra prefix 'model\.'.*submodule='model'"):
        load_adapters(tiny_llama(0), tmp_path / "prefixed")
    save_adapters(module, tmp_path / "bare", submodule="model")
    bare = tiny_llama(0)
    load_adapters(bare, tmp_path / "bare")
    assert torch.equal(model_out(bare, ids), ours)
    with pytest.raises(AdapterStateError, match=r"lack the prefix 'model\.'.*submodule='model'"):
        load_adapters(CausalLMModule(tiny_llama(0)), tmp_path / "bare")
    again = CausalLMModule(tiny_llama(0))
    load_adapters(again, tmp_path / "bare", submodule="model")
    assert torch.equal(model_out(again.model.eval(), ids), ours)
    assert get_plan(again).fingerprint() == get_plan(module).fingerprint()


def test_import_names_the_prefix_when_modules_are_missing(tmp_path):
    from lightning_peft.interop.export import import_peft

    _, folder = peft_adapter(tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"])
    module = CausalLMModule(tiny_llama(0))
    with pytest.raises(
        ExportError, match=r"lack the prefix 'model\.'; pass `--submodule model` \(Python: `submodule='model'`\)"
    ):
        import_peft(module, folder, submodule="")  # explicitly the LightningModule itself: names are off by `model.`
    assert get_plan(module) is None
    with pytest.raises(ExportError, match="does not exist"):
        import_peft(module, folder, submodule="nope")


# -- HiRA -----------------------------------------------------------------------------------------


def test_hira_exports_to_peft_hira_adapters(tmp_path):
    model = tiny_llama(0)
    policy = {
        "rules": [
            {"method": "hira", "modules": ["q_proj", "v_proj"], "hparams": {"r": 4}},
            {"method": "hira", "modules": ["down_proj"], "hparams": {"r": 2}},
        ]
    }
    inject_adapters(model, policy)
    randomize_adapters(model)
    ids = tokens()
    ours = model_out(model, ids)
    report = export_peft(model, tmp_path / "hira")
    assert set(report.adapters) == {"hira_r4", "hira_r2"}  # one HiraConfig per rank
    assert json.loads((tmp_path / "hira" / "hira_r4" / "adapter_config.json").read_text())["peft_type"] == "HIRA"
    assert rel_diff(model_out(load_peft_export(tiny_llama(0), tmp_path / "hira").eval(), ids), ours) < RTOL


def test_hira_beside_lora_needs_a_route(tmp_path):
    model = tiny_llama(0)
    policy = {
        "rules": [
            {"method": "hira", "modules": ["q_proj"], "hparams": {"r": 4}},
            {"method": "lora", "modules": ["v_proj"], "hparams": {"r": 4}},
        ]
    }
    inject_adapters(model, policy)
    randomize_adapters(model)
    with pytest.raises(ExportError, match=r"one adapter type per model.*routes=\{'hira': 'svd'\}"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    ids = tokens()
    report = export_peft(model, tmp_path / "out", routes={"hira": "svd"}, svd_energy=1.0, probe=ids)
    assert all(f.rel_error < 1e-6 for f in report.converted) and len(report.converted) == 6
    peft_model = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "out")).eval()
    assert rel_diff(model_out(peft_model, ids), model_out(model, ids)) < RTOL


def test_gpt2_conv1d_layers_round_trip_through_peft(tmp_path):
    from helpers import tiny_gpt2

    model = tiny_gpt2(0)
    policy = {
        "rules": [
            {"method": "lora", "modules": ["attn.c_attn"], "hparams": {"r": 4, "alpha": 8}},
            {"method": "dora", "modules": ["mlp.c_fc"], "hparams": {"r": 2, "alpha": 4}},
        ]
    }
    inject_adapters(model, policy)
    randomize_adapters(model)
    ids = tokens()
    ours = model_out(model, ids)
    report = export_peft(model, tmp_path / "gpt2")
    assert set(report.adapters) == {"lora_conv1d", "dora_conv1d"}
    config = json.loads((tmp_path / "gpt2" / "dora_conv1d" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_peft_export(tiny_gpt2(0), tmp_path / "gpt2").eval()
    assert rel_diff(model_out(loaded, ids), ours) < RTOL
    export_merged(model, tmp_path / "merged")
    assert rel_diff(model_out(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), ids), ours) < RTOL


def test_peft_lora_options_we_do_not_reproduce_are_named_errors(tmp_path):
    from lightning_peft.interop.export import import_peft
    from lightning_peft.interop.peft_format import PeftFormatError

    _, folder = peft_adapter(tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"])
    config = json.loads((folder / "adapter_config.json").read_text())
    for field, value, match in (
        ("lora_bias", True, "lora_bias"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("init_lora_weights", "pissa", "changes the base weights"),
    ):
        (folder / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        model = tiny_llama(0)
        with pytest.raises(PeftFormatError, match=match):
            import_peft(model, folder)
        assert get_plan(model) is None


def test_svd_table_fits_80_columns_without_wrapping_module_names():
    from rich.console import Console

    names = [f"model.model.layers.{b}.{kind}" for b in (0, 5) for kind in ("self_attn.q_proj", "mlp.down_proj")]
    report = ExportReport(path="out", format="peft", max_logit_diff=1.5e-3)
    report.converted = [LayerFidelity(n, "mora", 27, 128, 0.99, 1.2e-2, 3.4e-4) for n in names]
    console = Console(width=80, record=True, color_system=None)
    console.print(report.table())
    text = console.export_text()
    assert "under model.model.layers." in text
    for name in names:
        short = name.removeprefix("model.model.layers.")
        assert any(short in line and "27/128" in line for line in text.splitlines()), text
    assert max(len(line) for line in text.splitlines()) <= 80
