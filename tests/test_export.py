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
from lightning_peft.export import (
    MANIFEST_FILE,
    ExportError,
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
    assert (config["rank_pattern"] or config["alpha_pattern"]) and config["lora_dropout"] == (0.1 if policy is LORA_RANKS else 0.0)
    peft_model = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "adapter")).eval()
    assert rel_diff(model_out(peft_model, ids), ours) < RTOL
    loaded = {n: m for n, m in peft_model.named_modules()}
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
    assert set(report.adapters) == {"lora", "lora_rslora", "dora"}
    assert not (tmp_path / "adapter" / "adapter_config.json").exists()  # a partial load cannot happen silently
    # The documented peft recipe (also written to the folder's README.md), without our helper:
    peft_model = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "adapter" / "lora"), adapter_name="lora")
    peft_model.load_adapter(str(tmp_path / "adapter" / "lora_rslora"), adapter_name="lora_rslora")
    peft_model.load_adapter(str(tmp_path / "adapter" / "dora"), adapter_name="dora")
    peft_model.base_model.set_adapter(["lora", "lora_rslora", "dora"])
    assert rel_diff(model_out(peft_model.eval(), ids), ours) < RTOL
    assert rel_diff(model_out(load_peft_export(tiny_llama(0), tmp_path / "adapter").eval(), ids), ours) < RTOL
    one_only = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "adapter" / "lora")).eval()
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
    assert torch.equal(model_out(module.model, ids), ours) and not any(layer.merged for _, layer in find_adapters(module))


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
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base"), str(tmp_path / "out"))
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
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base"), str(tmp_path / "out"))
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
