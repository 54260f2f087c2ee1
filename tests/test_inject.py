"""Injection, removal, merging and adapter files on real HF architectures."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import BUILDERS, HYBRID, POLICIES, model_out, randomize_adapters, tiny_gpt2, tiny_llama, tokens
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_peft import (
    AdapterLinear,
    AdapterStateError,
    DoRA,
    LayerPolicy,
    LoRA,
    MoRA,
    Plan,
    adapter_state_dict,
    find_adapters,
    get_plan,
    inject_adapters,
    load_adapters,
    merge_adapters,
    remove_adapters,
    save_adapters,
    unmerge_adapters,
)

METHOD_CLASS = {"lora": LoRA, "dora": DoRA, "mora": MoRA}
# A hybrid plus a LoRA head and a fully trained final norm: every kind of plan row.
MIXED = {
    "rules": [
        {"method": "full", "modules": ["model.norm"]},
        {"method": "lora", "modules": ["lm_head"], "hparams": {"r": 4, "alpha": 8}},
        {"method": "mora", "modules": ["*"], "depth": {"outer": 1}, "hparams": {"r": 8}},
        {"method": "dora", "modules": ["*"], "depth": {"inner": 1}, "hparams": {"r": 4, "alpha": 8}},
    ]
}


def snapshot(model: nn.Module) -> tuple:
    """Everything injection or loading could change: tensors, flags, module types, plan."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    return state, flags, types, get_plan(model)


def assert_unchanged(model: nn.Module, snap: tuple) -> None:
    state, flags, types, plan = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert get_plan(model) is plan


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_isinstance_replacement(arch):
    model = BUILDERS[arch]()
    originals = dict(model.named_modules())
    ids = tokens()
    ref = model_out(model, ids)
    plan = inject_adapters(model, LayerPolicy.from_yaml(HYBRID))
    modules = dict(model.named_modules())
    for row in plan.rows:
        layer = modules[row.name]
        assert isinstance(layer, AdapterLinear)
        assert layer.base is originals[row.name]  # the very same base module, now frozen
        assert type(layer.base).__name__ == row.layer_type
        assert type(layer.adapter) is METHOD_CLASS[row.method]
        assert (layer.in_features, layer.out_features) == (row.in_features, row.out_features)
        assert layer.adapter.num_trainable_parameters() == row.params
    assert len(find_adapters(model)) == len(plan.rows)
    # a fresh injection is a zero update
    torch.testing.assert_close(model_out(model, ids), ref, rtol=0, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_params = {
        f"{n}.adapter.{k}" for n, layer in find_adapters(model) for k, _ in layer.adapter.named_parameters()
    }
    assert trainable == adapter_params


def test_double_injection_is_idempotent():
    model = tiny_llama()
    policy = LayerPolicy.from_yaml(HYBRID)
    plan = inject_adapters(model, policy)
    randomize_adapters(model)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    again = inject_adapters(model, LayerPolicy.from_yaml(HYBRID))  # an equal policy, another object
    assert again is plan
    assert inject_adapters(model, plan) is plan
    assert len(find_adapters(model)) == len(plan.rows) == 42
    assert not any(isinstance(layer.base, AdapterLinear) for _, layer in find_adapters(model))
    now = adapter_state_dict(model)
    assert all(torch.equal(now[k], state[k]) for k in state)  # adapters were not re-initialised


def test_different_policy_on_injected_model_raises():
    model = tiny_llama()
    inject_adapters(model, LayerPolicy.from_yaml(HYBRID))
    snap = snapshot(model)
    with pytest.raises(
        AdapterStateError, match=r"already carries a different adapter plan.*model.layers.0.self_attn.q_proj"
    ):
        inject_adapters(model, LayerPolicy.from_yaml(POLICIES / "lora_all.yaml"))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_remove_adapters_restores_model(arch):
    model = BUILDERS[arch]()
    types = [(n, type(m)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tokens()
    ref = model_out(model, ids)
    inject_adapters(model, LayerPolicy.from_yaml(HYBRID))
    randomize_adapters(model)
    assert not torch.allclose(model_out(model, ids), ref, atol=1e-3)
    remove_adapters(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model_out(model, ids), ref)
    assert all(p.requires_grad for p in model.parameters())  # the original flags are back
    assert get_plan(model) is None
    inject_adapters(model, LayerPolicy.from_yaml(POLICIES / "lora_all.yaml"))  # and it can take another policy


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_merge_equals_unmerged(arch):
    model = BUILDERS[arch]()
    inject_adapters(model, LayerPolicy.from_yaml(HYBRID))
    randomize_adapters(model, scale=0.2)
    ids = tokens()
    base_ref = model_out(BUILDERS[arch](), ids)
    unmerged = model_out(model, ids)
    assert (unmerged - base_ref).abs().max() > 1e-2  # the adapters really change the output
    merge_adapters(model)
    assert all(layer.merged for _, layer in find_adapters(model))
    torch.testing.assert_close(model_out(model, ids), unmerged, rtol=0, atol=1e-5)
    merge_adapters(model)  # a second merge is a no-op
    torch.testing.assert_close(model_out(model, ids), unmerged, rtol=0, atol=1e-5)
    unmerge_adapters(model)
    torch.testing.assert_close(model_out(model, ids), unmerged, rtol=0, atol=1e-5)


def test_remove_with_merge_gives_a_plain_model_with_the_same_outputs():
    model = tiny_gpt2()
    inject_adapters(model, LayerPolicy.from_yaml(HYBRID))
    randomize_adapters(model, scale=0.2)
    ids = tokens()
    adapted = model_out(model, ids)
    remove_adapters(model, merge=True)
    assert not find_adapters(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(model_out(model, ids), adapted, rtol=0, atol=1e-5)


# -- adapter files ----------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A trained-looking mixed-policy Llama saved to tmp_path/adapters."""
    model = tiny_llama()
    inject_adapters(model, LayerPolicy.from_dict(MIXED))
    randomize_adapters(model, scale=0.2)
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)  # the `full` module moved too
    directory = save_adapters(model, tmp_path / "adapters")
    return model, directory


def test_save_load_round_trip(saved):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["adapters.safetensors", "plan.json"]
    ids = tokens()
    expected = model_out(model, ids)
    fresh = tiny_llama()  # same seed: same base weights, no adapters
    assert not torch.allclose(model_out(fresh, ids), expected, atol=1e-3)
    plan = load_adapters(fresh, directory)
    assert plan == get_plan(model)
    assert torch.equal(model_out(fresh, ids), expected)
    file_state = load_file(directory / "adapters.safetensors")
    assert set(file_state) == set(adapter_state_dict(model))
    assert "model.norm.weight" in file_state
    assert all(".adapter." in k for k in file_state if k != "model.norm.weight")
    assert Plan.from_dict(json.loads((directory / "plan.json").read_text())) == get_plan(model)


def test_adapter_file_is_small(tmp_path):
    model = tiny_llama(hidden_size=64, intermediate_size=128, vocab_size=512)
    plan = inject_adapters(model, LayerPolicy.from_yaml(POLICIES / "lora_qv.yaml"))
    directory = save_adapters(model, tmp_path)
    size = (directory / "adapters.safetensors").stat().st_size
    adapter_bytes = 4 * plan.trainable_params
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert adapter_bytes <= size < adapter_bytes + 8192  # tensors plus a small header
    assert size < model_bytes / 20


def test_load_adapters_into_injected_model(saved):
    model, directory = saved
    other = tiny_llama()
    inject_adapters(other, LayerPolicy.from_dict(MIXED))  # same plan, fresh adapters
    load_adapters(other, directory)
    assert torch.equal(model_out(other, tokens()), model_out(model, tokens()))


def _edited_copy(directory, tmp_path, edit):
    out = tmp_path / "edited"
    out.mkdir()
    (out / "plan.json").write_text((directory / "plan.json").read_text())
    tensors = load_file(directory / "adapters.safetensors")
    edit(tensors)
    save_file(tensors, out / "adapters.safetensors")
    return out


def _wrong_shape(tensors):
    key = "model.layers.2.mlp.up_proj.adapter.lora_A"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])


@pytest.mark.parametrize(
    ("case", "target", "match"),
    [
        ("merged", "merged", "Cannot load adapters into a merged model"),
        (
            "narrower model",
            "shape",
            r"Shape mismatch for 'model.layers.0.mlp.gate_proj': plan has 32->64, model has 32->48",
        ),
        (
            "shallower model",
            "depth",
            r"Plan module 'model.layers.4.self_attn.q_proj' does not exist in LlamaForCausalLM",
        ),
        ("other plan", "other", r"its plan differs from the model's \(module 'model.layers.0.self_attn.q_proj'"),
        ("truncated", "fresh", "truncated or corrupted"),
        ("truncated", "injected", "truncated or corrupted"),
        (
            "wrong shape",
            "fresh",
            r"tensor 'model.layers.2.mlp.up_proj.adapter.lora_A' has shape \(5, 32\), the model needs \(4, 32\)",
        ),
        (
            "wrong shape",
            "injected",
            r"tensor 'model.layers.2.mlp.up_proj.adapter.lora_A' has shape \(5, 32\), the model needs \(4, 32\)",
        ),
        ("missing full weight", "fresh", r"missing \['model.norm.weight'\]"),
        ("unexpected tensor", "fresh", r"unexpected \['model.bogus.adapter.x'\]"),
        ("missing file", "fresh", "adapters.safetensors' is missing"),
    ],
)
def test_load_adapters_errors_leave_model_unchanged(saved, tmp_path, case, target, match):
    model, directory = saved
    if case == "truncated":
        data = (directory / "adapters.safetensors").read_bytes()
        (directory / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "wrong shape":
        directory = _edited_copy(directory, tmp_path, _wrong_shape)
    elif case == "missing full weight":
        directory = _edited_copy(directory, tmp_path, lambda t: t.pop("model.norm.weight"))
    elif case == "unexpected tensor":
        directory = _edited_copy(directory, tmp_path, lambda t: t.update({"model.bogus.adapter.x": torch.zeros(2)}))
    elif case == "missing file":
        (directory / "adapters.safetensors").unlink()

    if target == "shape":
        victim = tiny_llama(intermediate_size=48)
    elif target == "depth":
        victim = tiny_llama(num_hidden_layers=4)
    else:
        victim = tiny_llama()
    if target in ("merged", "injected"):
        inject_adapters(victim, LayerPolicy.from_dict(MIXED))
        if target == "merged":
            randomize_adapters(victim)
            merge_adapters(victim)
    elif target == "other":
        inject_adapters(victim, LayerPolicy.from_yaml(POLICIES / "lora_all.yaml"))
    snap = snapshot(victim)
    ids = tokens()
    before = model_out(victim, ids)
    with pytest.raises(AdapterStateError, match=match):
        load_adapters(victim, directory)
    assert_unchanged(victim, snap)
    assert torch.equal(model_out(victim, ids), before)


def test_save_refuses_merged_model(tmp_path):
    model = tiny_llama()
    inject_adapters(model, LayerPolicy.from_yaml(HYBRID))
    merge_adapters(model)
    with pytest.raises(AdapterStateError, match="merged model"):
        save_adapters(model, tmp_path)
    assert not (tmp_path / "adapters.safetensors").exists()


# -- a 7B-shaped model on the meta device ----------------------------------------------------


def test_llama_7b_shape_on_meta_device():
    """Resolve and inject a Llama-2-7B-shaped model without allocating its weights.

    Timing lives in benchmarks/plan_7b.py (never asserted here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    plan = LayerPolicy.from_yaml(HYBRID).resolve(model)
    assert plan.model_params == 6_738_415_616  # Llama-2-7B
    assert plan.num_blocks == 32 and len(plan.rows) == 32 * 7
    assert {r.block for r in plan.rows if r.method == "mora"} == {0, 31}
    # MoRA r=8 (rope, even side): attention 4096->4096 r_hat 256; MLP 4096<->11008 r_hat 348.
    mora = 2 * (4 * 256**2 + 3 * 348**2)
    dora = 30 * (4 * (8 * 8192 + 4096) + 2 * (8 * 15104 + 11008) + (8 * 15104 + 4096))
    assert plan.params_by_method() == {"mora": mora, "dora": dora}
    inject_adapters(model, plan)
    assert len(find_adapters(model)) == 224
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.trainable_params
