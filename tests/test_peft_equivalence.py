"""LoRA and DoRA against HF peft: forward, gradients, DoRA magnitude init and merged weights (fp32)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from helpers import paired_forward, random_base_layer
from peft import LoraConfig, get_peft_model
from torch import nn

from lightning_peft.adapters import AdapterLinear, DoRA, LoRA

IN, OUT, R, ALPHA = 24, 20, 4, 8.0
RTOL, ATOL = 1e-5, 1e-6


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Equal to float32 precision: `atol` scales with the tensor's largest entry, since a sum
    of products rounds at `eps * max|term|`, and entries that cancel keep that absolute error
    (DoRA's backward sums in another order than peft's autograd; tests/test_dora_fast_norm.py
    checks both against float64)."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL * scale, msg=msg or None)


def build_pair(*, dora: bool, dropout: float = 0.0, bias: bool = True, rslora: bool = False, conv1d: bool = False):
    """A peft-wrapped base and our AdapterLinear around an identical copy, with A and B copied over.

    `init_lora_weights=False` leaves B random in peft, so DoRA's magnitude init is exercised with B != 0.
    """
    base = random_base_layer(IN, OUT, bias=bias, conv1d=conv1d)
    ours_base = copy.deepcopy(base)
    cfg = LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=dropout,
        target_modules=["0"],
        use_dora=dora,
        use_rslora=rslora,
        init_lora_weights=False,
        fan_in_fan_out=conv1d,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(nn.Sequential(base), cfg)
    peft_layer = peft_model.base_model.model[0]
    cls = DoRA if dora else LoRA
    ours = AdapterLinear(ours_base, cls(IN, OUT, r=R, alpha=ALPHA, dropout=dropout, use_rslora=rslora))
    with torch.no_grad():
        ours.adapter.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.adapter.lora_B.copy_(peft_layer.lora_B["default"].weight)
        if dora:
            ours.adapter.reset_magnitude(ours)
    return peft_layer, ours


def peft_params(peft_layer, dora: bool) -> dict[str, torch.Tensor]:
    out = {"A": peft_layer.lora_A["default"].weight, "B": peft_layer.lora_B["default"].weight}
    if dora:
        out["m"] = peft_layer.lora_magnitude_vector["default"].weight
    return out


def our_params(ours, dora: bool) -> dict[str, torch.Tensor]:
    out = {"A": ours.adapter.lora_A, "B": ours.adapter.lora_B}
    if dora:
        out["m"] = ours.adapter.magnitude
    return out


def perturb_magnitude(peft_layer, ours):
    """Move m away from its init so that m / n != 1 (both sides get the same values)."""
    with torch.no_grad():
        m = peft_layer.lora_magnitude_vector["default"].weight
        m.mul_(1 + 0.3 * torch.randn_like(m))
        ours.adapter.magnitude.copy_(m)


CASES = [
    pytest.param(
        {"dora": d, "dropout": p, "bias": b, "rslora": rs}, id=f"{'dora' if d else 'lora'}-p{p}-bias{b}-rs{rs}"
    )
    for d in (False, True)
    for p in (0.0, 0.3)
    for b in (True, False)
    for rs in (False, True)
    if not (rs and b is False and p > 0)  # keep the grid small; rsLoRA only changes the scaling
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cfg", CASES)
def test_forward_and_gradients_match_peft(cfg, training):
    _check_forward_and_grads(cfg, training, conv1d=False)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_conv1d_base_matches_peft(dora, dropout):
    _check_forward_and_grads({"dora": dora, "dropout": dropout, "bias": True, "rslora": False}, True, conv1d=True)


def _check_forward_and_grads(cfg, training: bool, conv1d: bool):
    dora = cfg["dora"]
    peft_layer, ours = build_pair(**cfg, conv1d=conv1d)
    if dora:
        perturb_magnitude(peft_layer, ours)
    peft_layer.train(training)
    ours.train(training)
    assert ours.adapter.scaling == pytest.approx(peft_layer.scaling["default"], rel=1e-12)

    x = torch.randn(3, 5, IN)
    g = torch.randn(3, 5, OUT)
    yp, yo, xp, xo = paired_forward(peft_layer, ours, x)  # same dropout mask on both sides
    torch.testing.assert_close(yo, yp, rtol=RTOL, atol=ATOL)
    if cfg["dropout"] > 0 and training:  # the mask really was applied (else the test would not cover dropout)
        with torch.no_grad():
            peft_layer.eval()
            assert not torch.allclose(peft_layer(x), yp, rtol=1e-3, atol=1e-4)
    (yp * g).sum().backward()
    (yo * g).sum().backward()
    pp, op = peft_params(peft_layer, dora), our_params(ours, dora)
    for name in pp:
        assert pp[name].grad is not None and op[name].grad is not None, name
        assert pp[name].grad.abs().sum() > 0, name
        assert_close_fp32(op[name].grad, pp[name].grad, msg=name)
    assert_close_fp32(xo.grad, xp.grad)
    assert ours.base.weight.grad is None


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_dora_magnitude_init_matches_peft(conv1d, rslora):
    peft_layer, ours = build_pair(dora=True, rslora=rslora, conv1d=conv1d)
    b = peft_layer.lora_B["default"].weight
    assert b.abs().sum() > 0  # the case that matters: B != 0 at init
    m_peft = peft_layer.lora_magnitude_vector["default"].weight.detach()
    torch.testing.assert_close(ours.adapter.magnitude.detach(), m_peft, rtol=RTOL, atol=ATOL)
    # and it is the row norm of W0 + s B A in (out, in) layout, not the norm of W0 alone
    w0 = ours.base_weight().detach()
    s = ALPHA / (math.sqrt(R) if rslora else R)
    a = peft_layer.lora_A["default"].weight.detach()
    expected = torch.linalg.vector_norm(w0 + s * b.detach() @ a, dim=1)
    torch.testing.assert_close(ours.adapter.magnitude.detach(), expected, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(expected, torch.linalg.vector_norm(w0, dim=1), rtol=1e-3)


def test_dora_output_equals_lora_output_at_init_with_nonzero_b():
    """m initialised from W0 + sBA keeps W' = W0 + sBA (DoRA, arXiv 2402.09353; peft)."""
    peft_dora, dora = build_pair(dora=True)
    lora = AdapterLinear(copy.deepcopy(dora.base), LoRA(IN, OUT, r=R, alpha=ALPHA))
    with torch.no_grad():
        lora.adapter.lora_A.copy_(dora.adapter.lora_A)
        lora.adapter.lora_B.copy_(dora.adapter.lora_B)
    x = torch.randn(7, IN)
    torch.testing.assert_close(dora(x), lora(x), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(dora(x), peft_dora(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_weight_matches_peft(dora, conv1d):
    peft_layer, ours = build_pair(dora=dora, conv1d=conv1d)
    if dora:
        perturb_magnitude(peft_layer, ours)
    w_before = ours.base.weight.detach().clone()
    peft_layer.merge()
    ours.merge()
    merged_peft = peft_layer.get_base_layer().weight.detach()
    assert merged_peft.shape == ours.base.weight.shape
    torch.testing.assert_close(ours.base.weight.detach(), merged_peft, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(merged_peft, w_before, atol=1e-4)
    x = torch.randn(4, IN)
    torch.testing.assert_close(ours(x), peft_layer(x), rtol=RTOL, atol=ATOL)
