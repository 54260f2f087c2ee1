"""HiRA against HF peft (outputs, gradients, merge), its diagnostics against brute force, and
its placement by a policy in a real `Trainer.fit`: all through the generic adapter hooks."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from helpers import (
    CausalLMModule,
    model_out,
    paired_forward,
    random_base_layer,
    tiny_gpt2,
    tiny_llama,
    token_loader,
    tokens,
    trainer,
)
from peft import HiraConfig, get_peft_model
from test_diagnostics import adapted, assert_metrics_match, brute_force, probe_of, randomise
from torch import nn

from lightning_peft import AdapterCallback, LayerPolicy, inject_adapters, load_adapters, save_adapters
from lightning_peft.adapters import AdapterLinear, AdapterMethod, HiRA
from lightning_peft.core.inject import find_adapters, merge_adapters

IN, OUT, R = 24, 20, 4
RTOL, ATOL = 1e-5, 1e-6


def build_pair(*, dropout: float = 0.0, bias: bool = True, conv1d: bool = False):
    """peft's HiRA layer and ours around identical bases; `init_weights=False` gives random A and B in peft."""
    base = random_base_layer(IN, OUT, bias=bias, conv1d=conv1d)
    ours_base = copy.deepcopy(base)
    cfg = HiraConfig(r=R, hira_dropout=dropout, target_modules=["0"], init_weights=False, fan_in_fan_out=conv1d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_layer = get_peft_model(nn.Sequential(base), cfg).base_model.model[0]
    ours = AdapterLinear(ours_base, HiRA(IN, OUT, r=R, dropout=dropout))
    with torch.no_grad():
        peft_layer.hira_A["default"].mul_(0.1)  # keep W0 ⊙ BA of the size training reaches
        ours.adapter.hira_A.copy_(peft_layer.hira_A["default"])
        ours.adapter.hira_B.copy_(peft_layer.hira_B["default"])
    return peft_layer, ours


CASES = [
    pytest.param({"dropout": p, "bias": b, "conv1d": c}, id=f"{'conv1d' if c else 'linear'}-p{p}-bias{b}")
    for c in (False, True)
    for p in (0.0, 0.3)
    for b in (True, False)
    if not (c and not b)  # Conv1D always has a bias
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cfg", CASES)
def test_forward_and_gradients_match_peft(cfg, training):
    peft_layer, ours = build_pair(**cfg)
    peft_layer.train(training)
    ours.train(training)
    x, g = torch.randn(3, 5, IN), torch.randn(3, 5, OUT)
    yp, yo, xp, xo = paired_forward(peft_layer, ours, x)  # same dropout mask on both sides
    torch.testing.assert_close(yo, yp, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(yo, ours.base(x), atol=1e-3)  # the adapter contributes
    (yp * g).sum().backward()
    (yo * g).sum().backward()
    pairs = {
        "A": (ours.adapter.hira_A, peft_layer.hira_A["default"]),
        "B": (ours.adapter.hira_B, peft_layer.hira_B["default"]),
    }
    for name, (mine, theirs) in pairs.items():
        assert theirs.grad is not None and theirs.grad.abs().sum() > 0, name
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=RTOL, atol=ATOL, msg=name)
    torch.testing.assert_close(xo.grad, xp.grad, rtol=RTOL, atol=ATOL)
    assert ours.base.weight.grad is None


def test_init_is_peft_default():
    """B = 0 (the layer is its base) and A Kaiming-uniform with peft's bound `1 / sqrt(in)`."""
    layer = AdapterLinear(nn.Linear(IN, OUT), HiRA(IN, OUT, r=R))
    assert layer.adapter.hira_B.abs().max() == 0
    assert 0 < layer.adapter.hira_A.abs().max() <= 1 / math.sqrt(IN)
    x = torch.randn(4, IN)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_merged_weight_matches_peft_and_unmerges(conv1d):
    peft_layer, ours = build_pair(conv1d=conv1d)
    w_before = ours.base.weight.detach().clone()
    x = torch.randn(4, IN)
    with torch.no_grad():
        y = ours(x)
        peft_layer.merge()
        ours.merge()
        merged_peft = peft_layer.get_base_layer().weight.detach()
        torch.testing.assert_close(ours.base.weight, merged_peft, rtol=RTOL, atol=ATOL)
        assert not torch.allclose(merged_peft, w_before, atol=1e-4)
        torch.testing.assert_close(ours(x), peft_layer(x), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(ours(x), y, rtol=RTOL, atol=ATOL)  # merged equals unmerged
        ours.unmerge()
        peft_layer.unmerge()
        torch.testing.assert_close(ours.base.weight, w_before, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(ours.base.weight, peft_layer.get_base_layer().weight, rtol=RTOL, atol=ATOL)


def test_unmerge_is_exact_where_one_plus_ba_vanishes():
    """An entry with `1 + BA = 0` zeroes a merged weight: dividing cannot restore it, the kept copy does."""
    layer = AdapterLinear(nn.Linear(IN, OUT), HiRA(IN, OUT, r=1))
    with torch.no_grad():
        layer.adapter.hira_A.fill_(1.0)
        layer.adapter.hira_B.zero_()
        layer.adapter.hira_B[3, 0] = -1.0  # row 3 of 1 + BA is exactly 0
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    assert layer.base.weight[3].abs().max() == 0
    torch.testing.assert_close(layer.delta_weight(), -w0 * (torch.arange(OUT) == 3)[:, None].float())
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)


@pytest.mark.parametrize(("in_f", "out_f"), [(48, 40), (20, 70)], ids=["tall", "wide"])
def test_diagnostics_match_brute_force_through_the_default_route(in_f, out_f):
    layer = randomise(adapted(HiRA(in_f, out_f, r=4), in_f, out_f), scale=0.3)
    assert type(layer.adapter).update_singular_values is AdapterMethod.update_singular_values  # no HiRA code
    delta = layer.delta_weight()
    torch.testing.assert_close(delta, layer.base_weight() * (layer.adapter.hira_B @ layer.adapter.hira_A))
    assert torch.linalg.matrix_rank(delta.double()) > 4  # high rank at rank-4 parameters
    w0 = layer.base_weight().detach().clone()
    assert_metrics_match(probe_of(layer, "hira").measure(), brute_force(delta, w0))
    layer.merge()  # merged: the probe reads W0 back through `unmerge_weight`
    assert_metrics_match(probe_of(layer, "hira").measure(), brute_force(delta, w0))


HYBRID_WITH_HIRA = {
    "rules": [
        {"name": "hira-outer", "method": "hira", "modules": ["*"], "depth": {"outer": 1}, "hparams": {"r": 4}},
        {
            "name": "hira-attn-2",
            "method": "hira",
            "modules": ["q_proj", "v_proj"],
            "depth": {"indices": [2]},
            "hparams": {"r": 2},
        },
        {"name": "lora-rest", "method": "lora", "modules": ["*"], "depth": {"inner": 1}, "hparams": {"r": 4}},
    ]
}


@pytest.mark.parametrize(
    ("build", "attention"), [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])], ids=["llama", "gpt2"]
)
def test_policy_places_hira_in_any_block(build, attention):
    model = build()
    policy = copy.deepcopy(HYBRID_WITH_HIRA)
    policy["rules"][1]["modules"] = attention
    plan = LayerPolicy.from_dict(policy).resolve(model)
    hira = [r for r in plan.rows if r.method == "hira"]
    assert {r.block for r in hira} == {0, 2, 5}
    for row in hira:
        assert row.params == row.hparams["r"] * (row.in_features + row.out_features)
    inject_adapters(model, plan)
    assert {type(layer.adapter) for _, layer in find_adapters(model) if layer.method == "hira"} == {HiRA}


def test_hira_trains_in_a_fit_and_round_trips_through_files(tmp_path):
    module = CausalLMModule(tiny_llama(seed=3), lr=1e-2)  # an unmodified user module
    callback = AdapterCallback(LayerPolicy.from_dict(HYBRID_WITH_HIRA), verbose=False)
    trainer(tmp_path, max_steps=4, callbacks=[callback]).fit(module, token_loader(n=16))
    assert {layer.method for _, layer in find_adapters(module)} == {"hira", "lora"}
    for _, layer in find_adapters(module):
        if layer.method == "hira":
            assert layer.adapter.hira_B.abs().sum() > 0  # trained away from its zero init
    assert all(math.isfinite(x) for x in module.train_losses)
    ids = tokens(2)
    module.eval()
    expected = model_out(module.model, ids)
    save_adapters(module, tmp_path / "adapters")
    fresh = CausalLMModule(tiny_llama(seed=3)).eval()
    load_adapters(fresh, tmp_path / "adapters")
    torch.testing.assert_close(model_out(fresh.model, ids), expected, rtol=1e-5, atol=1e-5)
    merge_adapters(fresh)
    torch.testing.assert_close(model_out(fresh.model, ids), expected, rtol=1e-4, atol=1e-5)
