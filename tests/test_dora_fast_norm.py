"""DoRA's fast route (expanded row norm, fused autograd function, caches) against the dense formula and HF peft.

The reference is DoRA written out densely: `V = W0 + s B A` as an `out x in` matrix, its row
norm detached (paper §4.3, as peft), `y = (m / n) (W0 x_d + s B A x_d) + rest`, differentiated
by autograd. float64 runs must agree to ~1e-12; float32 runs to float32 precision.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import lightning_peft.adapters.dora as dora_module
from lightning_peft.adapters import AdapterLinear, DoRA

IN, OUT, R, ALPHA = 40, 28, 6, 9.0


def make(*, dtype=torch.float64, bias=True, dropout=0.0, conv1d=False, seed=0) -> AdapterLinear:
    torch.manual_seed(seed)
    base = Conv1D(OUT, IN) if conv1d else nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        base.weight.normal_(0, 0.3)
        if base.bias is not None:
            base.bias.normal_(0, 0.3)
    layer = AdapterLinear(base.to(dtype), DoRA(IN, OUT, r=R, alpha=ALPHA, dropout=dropout))
    with torch.no_grad():  # B != 0 and m != n: every term of the formula is live
        layer.adapter.lora_B.normal_(0, 0.3)
        layer.adapter.magnitude.mul_(1 + 0.3 * torch.randn_like(layer.adapter.magnitude))
    return layer


def dense_reference(layer: AdapterLinear, x: torch.Tensor) -> torch.Tensor:
    """DoRA written out with the `out x in` matrix (the formula the fast route must equal)."""
    ad = layer.adapter
    w0 = layer.base_weight()
    v = w0 + ad.scaling * ad.lora_B @ ad.lora_A
    n = torch.linalg.vector_norm(v, dim=1).clamp_min(ad.eps).detach()  # detached, as peft (paper §4.3)
    x_d = ad.dropout(x)
    z = F.linear(x_d, w0) + ad.scaling * F.linear(F.linear(x_d, ad.lora_A), ad.lora_B)
    rest = F.linear(x, w0, layer.bias) - F.linear(x_d, w0)  # bias, plus W0 (x - x_d) with dropout
    return (ad.magnitude / n) * z + rest


def outputs_and_grads(layer: AdapterLinear, x: torch.Tensor, g: torch.Tensor, forward) -> dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(7)  # the same dropout mask for both routes
    y = forward(layer, x)
    (y * g).sum().backward()
    out = {"y": y.detach(), "x": x.grad}
    out.update({name: p.grad for name, p in layer.adapter.named_parameters()})
    return out


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = max(1.0, float(expected.abs().max()))  # sums of products round at eps * max|term|
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-6 * scale, msg=name)


CASES = [
    pytest.param({"bias": True}, id="bias"),
    pytest.param({"bias": False}, id="nobias"),
    pytest.param({"dropout": 0.25}, id="dropout"),
    pytest.param({"conv1d": True}, id="conv1d"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_equal_the_dense_formula(case, training):
    for dtype in (torch.float64, torch.float32):
        layer = make(dtype=dtype, **case).train(training)
        x, g = torch.randn(3, 5, IN, dtype=dtype), torch.randn(3, 5, OUT, dtype=dtype)
        fast = outputs_and_grads(layer, x, g, lambda m, t: m(t))
        dense = outputs_and_grads(layer, x, g, dense_reference)
        assert set(fast) == {"y", "x", "lora_A", "lora_B", "magnitude"}
        for name, expected in dense.items():
            if dtype == torch.float64:
                torch.testing.assert_close(fast[name], expected, rtol=1e-10, atol=1e-11, msg=name)
            else:
                assert_fp32_close(fast[name], expected, name)


def test_float32_error_is_that_of_the_dense_route():
    """Against float64, the fast float32 route is as accurate as the dense float32 formula."""
    layer64 = make(dtype=torch.float64)
    layer32 = copy.deepcopy(layer64).float()
    x, g = torch.randn(64, IN, dtype=torch.float64), torch.randn(64, OUT, dtype=torch.float64)
    exact = outputs_and_grads(layer64, x, g, dense_reference)
    fast = outputs_and_grads(layer32, x.float(), g.float(), lambda m, t: m(t))
    dense = outputs_and_grads(layer32, x.float(), g.float(), dense_reference)
    for name, value in exact.items():
        err_fast = float((fast[name].double() - value).abs().max())
        err_dense = float((dense[name].double() - value).abs().max())
        assert err_fast <= 4 * err_dense + 1e-6 * float(value.abs().max()), (name, err_fast, err_dense)


def test_the_norm_is_detached():
    """A and B get the gradient of `(m / n) z` with `n` constant: it differs from differentiating `n`."""
    layer = make()
    x, g = torch.randn(8, IN, dtype=torch.float64), torch.randn(8, OUT, dtype=torch.float64)
    fast = outputs_and_grads(layer, x, g, lambda m, t: m(t))

    def through_norm(m: AdapterLinear, t: torch.Tensor) -> torch.Tensor:
        ad = m.adapter
        v = m.base_weight() + ad.scaling * ad.lora_B @ ad.lora_A
        return F.linear(t, (ad.magnitude / torch.linalg.vector_norm(v, dim=1)).unsqueeze(1) * v, m.bias)

    full = outputs_and_grads(layer, x, g, through_norm)
    torch.testing.assert_close(fast["y"], full["y"], rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(fast["magnitude"], full["magnitude"], rtol=1e-10, atol=1e-11)
    assert not torch.allclose(fast["lora_A"], full["lora_A"], rtol=1e-3, atol=1e-6)


def test_row_norms_clamp_cancellation_and_zero_rows():
    """`||W0_i||^2 + 2s<W0_i, (BA)_i> + s^2 ||(BA)_i||^2` cancels when `W0_i = -s (BA)_i`:
    clamped at 0 before the root, floored at eps after."""
    torch.manual_seed(0)
    a, b = torch.randn(R, IN), torch.randn(OUT, R)
    s, eps = 1.5, 1e-6
    w0 = torch.randn(OUT, IN)
    w0[0] = -s * (b[0] @ a)  # cancels exactly in real arithmetic; rounding leaves +-tiny
    w0[1] = 0.0
    b[1] = 0.0  # a zero row of W0 and of BA
    got = dora_module.dora_row_norms(w0, a, b, s, eps)
    expected = torch.linalg.vector_norm(w0 + s * b @ a, dim=1).clamp_min(eps)
    assert torch.isfinite(got).all() and bool((got >= eps).all())
    assert float(got[1]) == pytest.approx(eps)
    assert float(got[0]) < 1e-2  # the cancelled row is tiny (not NaN, not a large negative under the root)
    torch.testing.assert_close(got[2:], expected[2:], rtol=1e-5, atol=1e-6)
    # The cached-base route is the same function
    torch.testing.assert_close(dora_module.dora_row_norms(w0, a, b, s, eps, dora_module.base_row_sq(w0)), got)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_peft_dora_at_a_larger_shape(bias, training):
    """peft's DoRA (the oracle of tests/test_peft_equivalence.py) at a shape where the fast route's sums are long."""
    in_f, out_f, r = 96, 72, 8
    torch.manual_seed(3)
    base = nn.Linear(in_f, out_f, bias=bias)
    ours_base = copy.deepcopy(base)
    cfg = LoraConfig(r=r, lora_alpha=16, target_modules=["0"], use_dora=True, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_layer = get_peft_model(nn.Sequential(base), cfg).base_model.model[0]
    ours = AdapterLinear(ours_base, DoRA(in_f, out_f, r=r, alpha=16))
    with torch.no_grad():
        ours.adapter.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.adapter.lora_B.copy_(peft_layer.lora_B["default"].weight)
        ours.adapter.reset_magnitude(ours)
        m = peft_layer.lora_magnitude_vector["default"].weight
        m.mul_(1 + 0.3 * torch.randn_like(m))
        ours.adapter.magnitude.copy_(m)
    peft_layer.train(training)
    ours.train(training)
    x, g = torch.randn(4, 16, in_f), torch.randn(4, 16, out_f)
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yo = peft_layer(xp), ours(xo)
    assert_fp32_close(yo, yp, "y")
    (yp * g).sum().backward()
    (yo * g).sum().backward()
    pairs = {
        "A": (ours.adapter.lora_A, peft_layer.lora_A["default"].weight),
        "B": (ours.adapter.lora_B, peft_layer.lora_B["default"].weight),
        "m": (ours.adapter.magnitude, peft_layer.lora_magnitude_vector["default"].weight),
    }
    for name, (mine, theirs) in pairs.items():
        assert_fp32_close(mine.grad, theirs.grad, name)
    assert_fp32_close(xo.grad, xp.grad, "x")


def test_half_precision_base_stays_close_to_the_float32_formula():
    layer = make(dtype=torch.float32, bias=False)
    half = copy.deepcopy(layer)
    half.base.to(torch.bfloat16)
    x = torch.randn(6, IN)
    with torch.no_grad():
        expected = dense_reference(layer, x)
    y = half(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=3e-2)
    y.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in half.adapter.parameters())


# -- caches ----------------------------------------------------------------------------------


def count_calls(monkeypatch, name: str) -> list[int]:
    calls = [0]
    original = getattr(dora_module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(dora_module, name, counted)
    return calls


def fresh(layer: AdapterLinear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return dense_reference(layer, x)


def test_no_grad_reuses_m_over_n_until_a_parameter_update(monkeypatch):
    """Generation under plain `torch.no_grad()` (HF `generate`) computes `m / n` once, and an
    optimizer step (in place, under no_grad) makes the next forward recompute it."""
    layer = make(dtype=torch.float32).eval()
    x = torch.randn(2, IN)
    norms = count_calls(monkeypatch, "dora_row_norms")
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
    assert norms[0] == 1
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    torch.testing.assert_close(y1, fresh(layer, x), rtol=1e-5, atol=1e-6)

    optimizer = torch.optim.AdamW(layer.adapter.parameters(), lr=0.05)
    for p in layer.adapter.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # in place, no forward with gradients in between
    with torch.no_grad():
        y3 = layer(x)
    assert norms[0] == 2 and not torch.allclose(y3, y1)
    torch.testing.assert_close(y3, fresh(layer, x), rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        layer.adapter.magnitude.mul_(1.1)  # any in-place edit of a plain tensor bumps its version
        torch.testing.assert_close(layer(x), fresh(layer, x), rtol=1e-5, atol=1e-6)
    assert norms[0] == 3


def test_frozen_adapters_use_the_cache_with_grad_enabled(monkeypatch):
    layer = make(dtype=torch.float32).eval().requires_grad_(False)
    x = torch.randn(2, IN)
    norms = count_calls(monkeypatch, "dora_row_norms")
    assert torch.is_grad_enabled()
    y = layer(x)
    layer(x)
    assert norms[0] == 1 and not y.requires_grad
    torch.testing.assert_close(y, fresh(layer, x), rtol=1e-5, atol=1e-6)


def test_base_row_norms_computed_once_while_training(monkeypatch):
    layer = make(dtype=torch.float32).train()
    optimizer = torch.optim.SGD(layer.adapter.parameters(), lr=0.1)
    base_sq = count_calls(monkeypatch, "base_row_sq")
    x = torch.randn(4, IN)
    for _ in range(3):
        optimizer.zero_grad()
        y = layer(x)
        torch.testing.assert_close(y, dense_reference(layer, x), rtol=1e-5, atol=1e-6)
        y.square().sum().backward()
        optimizer.step()
    assert base_sq[0] == 1  # W0 is frozen: its row norms are computed once


def _check_follows_base(layer: AdapterLinear, x: torch.Tensor, base_sq: list[int], what: str) -> None:
    before = base_sq[0]
    with torch.enable_grad():
        y = layer(x)
    assert base_sq[0] == before + 1, f"{what}: ||W0_i||^2 was not recomputed"
    torch.testing.assert_close(y.detach(), fresh(layer, x), rtol=1e-5, atol=1e-5, msg=what)


def test_base_row_norms_follow_every_change_of_the_base_weight(monkeypatch):
    layer = make(dtype=torch.float32).train()
    x = torch.randn(4, IN)
    layer(x)
    base_sq = count_calls(monkeypatch, "base_row_sq")

    with torch.no_grad():
        layer.base.weight.mul_(1.5)  # an in-place edit (version counter)
    _check_follows_base(layer, x, base_sq, "in-place edit")

    state = {k: v * 0.5 if k == "base.weight" else v for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    _check_follows_base(layer, x, base_sq, "load_state_dict")

    layer.base.weight = nn.Parameter(layer.base.weight.detach() * 2, requires_grad=False)
    _check_follows_base(layer, x, base_sq, "parameter reassignment")

    layer.merge()
    layer.unmerge()
    _check_follows_base(layer, x, base_sq, "merge and unmerge")

    layer.merge_and_restart(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.adapter.lora_B.normal_(0, 0.3)  # a trained step of the new cycle
    _check_follows_base(layer, x, base_sq, "merge and restart")

    layer.double()
    before = base_sq[0]
    y = layer(x.double())
    assert base_sq[0] == before + 1 and y.dtype == torch.float64
    torch.testing.assert_close(y.detach(), fresh(layer, x.double()), rtol=1e-10, atol=1e-10)


def test_inference_mode_cache_still_used(monkeypatch):
    layer = make(dtype=torch.float32).eval()
    x = torch.randn(2, IN)
    norms = count_calls(monkeypatch, "dora_row_norms")
    with torch.inference_mode():
        y1, y2 = layer(x), layer(x)
    assert norms[0] == 1
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(y1, fresh(layer, x), rtol=1e-5, atol=1e-6)
