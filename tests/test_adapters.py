"""Contract battery for every registered adapter method (and every MoRA variant)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.adapters import (
    ADAPTERS,
    AdapterLinear,
    DoRA,
    LoRA,
    MoRA,
    check_hyperparameters,
    get_adapter_class,
    hyperparameter_names,
)
from lightning_peft.adapters.mora import VARIANTS

IN, OUT = 24, 20


def _cases():
    cases = []
    for name in sorted(ADAPTERS):
        if name == "mora":
            cases += [pytest.param(name, {"mora_type": v}, id=f"mora-{v}") for v in VARIANTS]
        else:
            cases.append(pytest.param(name, {}, id=name))
    return cases


CASES = _cases()


def make_adapter(method: str, extra: dict, in_f: int = IN, out_f: int = OUT, **overrides):
    cls = get_adapter_class(method)
    names = hyperparameter_names(cls)
    hp = {"r": 2} if "r" in names else {}
    hp.update(extra)
    hp.update(overrides)
    return cls(in_f, out_f, **hp)


def make_layer(method: str, extra: dict, *, dtype=torch.float32, conv1d: bool = False, bias: bool = True, **kw):
    in_f, out_f = kw.pop("in_f", IN), kw.pop("out_f", OUT)
    if conv1d:
        base = Conv1D(out_f, in_f).to(dtype)
        with torch.no_grad():
            base.weight.normal_(0, 0.2)
            base.bias.normal_(0, 0.2)
    else:
        base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    return AdapterLinear(base, make_adapter(method, extra, in_f, out_f, **kw))


@torch.no_grad()
def randomize(layer: AdapterLinear, scale: float = 0.1) -> None:
    """Give every adapter tensor a random, non-initial value."""
    for p in layer.adapter.parameters():
        p.add_(scale * torch.randn_like(p))


def adapter_params(layer: AdapterLinear) -> dict[str, torch.Tensor]:
    return dict(layer.adapter.named_parameters())


def test_registry_lists_the_three_methods():
    assert {"lora", "dora", "mora"} <= set(ADAPTERS)
    for name, cls in ADAPTERS.items():
        assert cls.method == name
        assert get_adapter_class(name) is cls


# -- initialisation ----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "extra"), CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_identity_at_init(method, extra, bias):
    layer = make_layer(method, extra, bias=bias)
    x = torch.randn(3, 5, IN)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), torch.zeros(OUT, IN), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("method", "extra"), CASES)
def test_trainable_parameters(method, extra):
    layer = make_layer(method, extra)
    adapter = layer.adapter
    assert adapter.num_trainable_parameters() > 0
    assert adapter.num_trainable_parameters() == sum(p.numel() for p in layer.parameters() if p.requires_grad)
    hp = {k: v for k, v in {"r": 2, **extra}.items() if k in hyperparameter_names(type(adapter))}
    assert type(adapter).count_parameters(IN, OUT, **hp) == adapter.num_trainable_parameters()
    for p in layer.base.parameters():
        assert not p.requires_grad


def test_parameter_counts():
    assert LoRA.count_parameters(IN, OUT, r=4) == 4 * (IN + OUT)
    assert DoRA.count_parameters(IN, OUT, r=4) == 4 * (IN + OUT) + OUT
    assert MoRA.count_parameters(IN, OUT, r=4, mora_type="sharing") == round(math.sqrt((IN + OUT) * 4)) ** 2


# -- merge -------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "extra"), CASES)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_merge_unmerge(method, extra, conv1d):
    layer = make_layer(method, extra, conv1d=conv1d)
    randomize(layer)
    layer.eval()
    x = torch.randn(4, 3, IN)
    with torch.no_grad():
        y = layer(x)
        delta = layer.delta_weight()
        w0 = layer.base.weight.clone()
        assert delta.abs().max() > 1e-3  # the adapter does something

        # dense delta agrees with the unmerged forward
        torch.testing.assert_close(y - layer.base(x), x @ delta.T, rtol=1e-5, atol=1e-5)

        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer.base_weight(), (w0.t() if conv1d else w0) + delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.delta_weight(), delta, rtol=1e-5, atol=1e-5)

        merged_w = layer.base.weight.clone()
        layer.merge()  # no-op
        assert torch.equal(layer.base.weight, merged_w)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)

        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(layer.base.weight, w0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        unmerged_w = layer.base.weight.clone()
        layer.unmerge()  # no-op
        assert torch.equal(layer.base.weight, unmerged_w)


# -- training ----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "extra"), CASES)
def test_sgd_steps_train_only_the_adapter(method, extra):
    layer = make_layer(method, extra)
    base_state = {k: v.clone() for k, v in layer.base.state_dict().items()}
    before = {k: v.detach().clone() for k, v in adapter_params(layer).items()}
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(8, IN), torch.randn(8, OUT)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(layer(x), target).backward()
        opt.step()
    for k, v in layer.base.state_dict().items():
        assert torch.equal(v, base_state[k]), k
    for p in layer.base.parameters():
        assert not p.requires_grad
        assert p.grad is None
    for name, p in adapter_params(layer).items():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"


@pytest.mark.parametrize(("method", "extra"), CASES)
def test_dropout_only_in_training(method, extra):
    if "dropout" not in hyperparameter_names(get_adapter_class(method)):
        pytest.skip("method has no dropout")
    layer = make_layer(method, extra, dropout=0.5)
    randomize(layer)
    x = torch.randn(6, IN)
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(layer(x), y_eval, rtol=0, atol=0)
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), y1, rtol=0, atol=0)  # deterministic given the seed
    assert not torch.allclose(y1, y_eval, atol=1e-4)
    # dropout never touches the base path: with the adapter zeroed, training output is the base output
    with torch.no_grad():
        for name, p in layer.adapter.named_parameters():
            if name != "magnitude":
                p.zero_()
        if method == "dora":
            layer.adapter.reset_magnitude(layer)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=1e-6)


# -- dtype and device --------------------------------------------------------------------


@pytest.mark.parametrize(("method", "extra"), CASES)
def test_bf16_base(method, extra):
    layer32 = make_layer(method, extra)
    randomize(layer32)
    layer16 = copy.deepcopy(layer32)
    layer16.base.to(torch.bfloat16)
    layer16 = AdapterLinear(layer16.base, layer16.adapter)
    if method == "dora":  # magnitude is reset from the bf16 W0 on wrapping; give both the same values
        with torch.no_grad():
            layer16.adapter.magnitude.copy_(layer32.adapter.magnitude)
    with torch.no_grad():
        layer32.base.weight.copy_(layer16.base.weight.float())
        layer32.base.bias.copy_(layer16.base.bias.float())
    for p in layer16.adapter.parameters():
        assert p.dtype == torch.float32
    x = torch.randn(4, 3, IN)
    y = layer16(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), layer32(x), rtol=5e-2, atol=5e-2)
    y.float().square().sum().backward()
    for name, p in layer16.adapter.named_parameters():
        assert p.dtype == torch.float32, name
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    assert layer16.base.weight.dtype == torch.bfloat16 and layer16.base.weight.grad is None


@pytest.mark.parametrize(("method", "extra"), CASES)
@pytest.mark.parametrize(
    ("dtype", "adapter_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_adapter_linear_keeps_base_dtype(method, extra, dtype, adapter_dtype):
    layer = make_layer(method, extra, dtype=dtype)
    assert layer.base.weight.dtype == dtype
    assert layer.base.bias.dtype == dtype
    for p in layer.adapter.parameters():
        assert p.dtype == adapter_dtype
        assert p.device == layer.base.weight.device
    assert layer.delta_weight().dtype == adapter_dtype


@pytest.mark.parametrize(("method", "extra"), CASES)
def test_adapter_linear_keeps_meta_device(method, extra):
    base = nn.Linear(IN, OUT, device="meta")
    layer = AdapterLinear(base, make_adapter(method, extra))
    assert layer.base.weight.device.type == "meta"
    for p in layer.adapter.parameters():
        assert p.device.type == "meta"


@pytest.mark.parametrize(("method", "extra"), CASES)
def test_gradcheck_float64(method, extra):
    layer = make_layer(method, extra, dtype=torch.float64, in_f=6, out_f=5)
    randomize(layer, scale=0.5)
    names = [n for n, _ in layer.named_parameters() if n.startswith("adapter.")]
    if method == "dora":
        # DoRA detaches the row norm (paper §4.3, as peft): A and B gradients are not the exact derivative.
        names = [n for n in names if n.endswith("magnitude")]
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters() if n in names}
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params.values()), eps=1e-6, atol=1e-6)


# -- bad input ---------------------------------------------------------------------------


def test_unknown_method():
    with pytest.raises(ValueError, match=r"Unknown adapter method 'lorra'.*lora"):
        get_adapter_class("lorra")


def _methods_with(hparam: str):
    return [m for m in sorted(ADAPTERS) if hparam in hyperparameter_names(ADAPTERS[m])]


@pytest.mark.parametrize("method", _methods_with("r"))
@pytest.mark.parametrize("r", [0, -2, 2.5, "8", True, None])
def test_bad_rank(method, r):
    with pytest.raises(ValueError, match=r"`r` must be a positive integer"):
        get_adapter_class(method)(IN, OUT, r=r)


@pytest.mark.parametrize("method", _methods_with("dropout"))
@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, "0.1", True])
def test_bad_dropout(method, p):
    with pytest.raises(ValueError, match=r"`dropout` must be a float in \[0, 1\)"):
        get_adapter_class(method)(IN, OUT, dropout=p)


@pytest.mark.parametrize("method", _methods_with("alpha"))
@pytest.mark.parametrize("alpha", [0, -1.0, "16"])
def test_bad_alpha(method, alpha):
    with pytest.raises(ValueError, match=r"`alpha` must be a positive number"):
        get_adapter_class(method)(IN, OUT, alpha=alpha)


@pytest.mark.parametrize("base", [nn.Conv2d(3, 4, 3), nn.Embedding(10, 4), nn.Conv1d(3, 4, 1)], ids=type)
def test_unsupported_module(base):
    with pytest.raises(ValueError, match=f"Unsupported module type {type(base).__name__}"):
        AdapterLinear(base, LoRA(3, 4))


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"cannot wrap a 8->4 layer"):
        AdapterLinear(nn.Linear(8, 4), LoRA(8, 5))


def test_unknown_mora_type():
    with pytest.raises(ValueError, match=r"Unknown `mora_type` 'type5'"):
        MoRA(IN, OUT, mora_type="type5")


def test_unknown_hyperparameter():
    with pytest.raises(ValueError, match=r"Unknown hyper-parameter\(s\) \['rnak'\] for method 'lora'"):
        check_hyperparameters("lora", {"rnak": 8})
    with pytest.raises(ValueError, match="alpha"):
        check_hyperparameters("mora", {"r": 8, "alpha": 16})
    with pytest.raises(ValueError, match="Unknown adapter method"):
        check_hyperparameters("lorra", {"r": 8})
    check_hyperparameters("lora", {"r": 8, "alpha": 16, "dropout": 0.1, "use_rslora": True})
    check_hyperparameters("mora", {"r": 8, "mora_type": "rope", "dropout": 0.0})


# -- DoRA specifics ----------------------------------------------------------------------


def test_dora_zero_norm_rows():
    base = nn.Linear(IN, OUT)
    with torch.no_grad():
        base.weight[3].zero_()
        base.weight[7].zero_()
    with pytest.warns(UserWarning, match=r"2 weight row\(s\).*zero norm"):
        layer = AdapterLinear(base, DoRA(IN, OUT, r=2))
    assert layer.adapter.magnitude[3] == 0 and layer.adapter.magnitude[7] == 0
    opt = torch.optim.SGD(layer.adapter.parameters(), lr=0.1)
    x = torch.randn(5, IN)
    for _ in range(3):
        opt.zero_grad()
        y = layer(x)
        assert torch.isfinite(y).all()
        y.square().sum().backward()
        for name, p in layer.adapter.named_parameters():
            assert torch.isfinite(p.grad).all(), name
        opt.step()
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 3], base.bias[3].expand(5))  # the zero row stays at zero (bias only)
    layer.merge()
    assert torch.isfinite(layer.base.weight).all()


def test_dora_no_warning_for_regular_weights():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdapterLinear(nn.Linear(IN, OUT), DoRA(IN, OUT, r=2))


def test_dora_eval_cache_follows_parameter_updates():
    layer = make_layer("dora", {})
    randomize(layer)
    layer.eval()
    x = torch.randn(4, IN)
    with torch.no_grad():
        y1 = layer(x)
        layer.adapter.lora_B.add_(0.5 * torch.randn_like(layer.adapter.lora_B))
        y2 = layer(x)
    with torch.enable_grad():
        y_ref = layer(x)
    assert not torch.allclose(y1, y2)
    torch.testing.assert_close(y2, y_ref, rtol=1e-6, atol=1e-6)


def test_dora_reference_formula():
    """W' = (m / ||W0 + sBA||_row) (W0 + sBA), bias not rescaled (DoRA, arXiv 2402.09353)."""
    layer = make_layer("dora", {}, r=3, alpha=6.0)
    randomize(layer, scale=0.3)
    ad = layer.adapter
    w0, b = layer.base.weight.detach(), layer.base.bias.detach()
    v = w0 + 2.0 * ad.lora_B.detach() @ ad.lora_A.detach()
    w_eff = (ad.magnitude.detach() / torch.linalg.vector_norm(v, dim=1)).unsqueeze(1) * v
    x = torch.randn(6, IN)
    torch.testing.assert_close(layer(x), x @ w_eff.T + b, rtol=1e-5, atol=1e-6)


def test_lora_reference_formula():
    layer = make_layer("lora", {}, r=3, alpha=6.0, use_rslora=True)
    randomize(layer, scale=0.3)
    ad = layer.adapter
    s = 6.0 / math.sqrt(3)
    x = torch.randn(6, IN)
    expected = layer.base(x) + s * x @ ad.lora_A.detach().T @ ad.lora_B.detach().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_dora_norm_does_not_overflow_in_fp16():
    """Row norms of large fp16 weights exceed fp16's range (65504); DoRA computes them in fp32."""
    from torch import nn

    from lightning_peft.adapters import AdapterLinear, DoRA

    base = nn.Linear(256, 8, bias=False).half()
    with torch.no_grad():
        base.weight.fill_(40.0)  # row norm 640, squared 409600 > 65504
    layer = AdapterLinear(base, DoRA(256, 8, r=4))
    assert layer.adapter.magnitude.dtype == torch.float32
    torch.testing.assert_close(layer.adapter.magnitude, torch.full((8,), 640.0))
    with torch.no_grad():
        layer.adapter.lora_B.normal_()
    norm = layer.adapter.weight_norm(base.weight)
    expected = torch.linalg.vector_norm(base.weight.float() + layer.adapter.low_rank_weight(), dim=1)
    assert torch.isfinite(norm).all()
    torch.testing.assert_close(norm, expected, rtol=1e-4, atol=1e-3)


# -- DoRA under sharding, moves, reassignment and compilation ------------------------------


def _dora_eval_pair():
    layer = make_layer("dora", {})
    randomize(layer)
    layer.eval()
    return layer, torch.randn(4, IN)


def _fresh_output(layer: AdapterLinear, x: torch.Tensor) -> torch.Tensor:
    """The uncached reference: `c = m / n` recomputed (grad mode takes the uncached path)."""
    with torch.enable_grad():
        return layer(x).detach()


def test_dora_inference_cache_is_used_and_dropped_by_train_load_and_merge():
    layer, x = _dora_eval_pair()
    with torch.inference_mode():
        y1 = layer(x)
        assert layer.adapter._eval_scale is not None  # cached for the next token
        torch.testing.assert_close(layer(x), y1, rtol=0, atol=0)
    state = {k: v + 0.3 * torch.randn_like(v) for k, v in layer.adapter.state_dict().items()}
    layer.adapter.load_state_dict(state)  # new values through load_state_dict
    with torch.inference_mode():
        y2 = layer(x)
    assert not torch.allclose(y1, y2)
    torch.testing.assert_close(y2, _fresh_output(layer, x), rtol=1e-6, atol=1e-6)
    layer.train()  # a training phase in between
    with torch.no_grad():
        layer.adapter.lora_A.add_(0.3)
    layer.eval()
    expected = _fresh_output(layer, x)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer.merge()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.adapter.lora_B.add_(0.3)
    layer.adapter.invalidate_cache()  # the documented step after an in-place edit outside training
    expected = _fresh_output(layer, x)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_dora_follows_parameter_reassignment_and_moves():
    layer, x = _dora_eval_pair()
    with torch.inference_mode():
        layer(x)
    layer.adapter.lora_B = nn.Parameter(layer.adapter.lora_B.detach() + 0.5)  # a new tensor object
    expected = _fresh_output(layer, x)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer.base.weight = nn.Parameter(2 * layer.base.weight.detach(), requires_grad=False)
    expected = _fresh_output(layer, x)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer.double()
    expected = _fresh_output(layer, x.double())
    with torch.inference_mode():
        y = layer(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_dora_refresh_keeps_trained_or_restored_magnitudes():
    layer = make_layer("dora", {})
    assert not layer.adapter.refresh_from_base(layer)  # nothing changed since init
    with torch.no_grad():
        layer.base.weight.mul_(2.0)  # "pretrained weights loaded after injection"
    assert layer.adapter.refresh_from_base(layer)
    torch.testing.assert_close(layer.adapter.magnitude.detach(), layer.base.weight.detach().norm(dim=1))
    with torch.no_grad():
        layer.adapter.magnitude.add_(0.1)  # trained (or restored): never overwritten
        layer.base.weight.mul_(2.0)
    trained = layer.adapter.magnitude.detach().clone()
    assert not layer.adapter.refresh_from_base(layer)
    assert torch.equal(layer.adapter.magnitude.detach(), trained)


def test_dora_refresh_and_forward_on_sharded_parameters():
    """FSDP2 (`fully_shard`) turns parameters into DTensors: the fit-start refresh and the forward must
    work on them (the address/version caches crashed: `aten.equal` on mixed Tensor and DTensor)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # in-process: no port to collide
    try:
        layer = make_layer("dora", {})
        reference = copy.deepcopy(layer)
        with torch.no_grad():
            for target in (layer, reference):
                target.base.weight.mul_(3.0)  # loaded after injection
        assert reference.adapter.refresh_from_base(reference)
        fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
        assert isinstance(layer.adapter.magnitude, DTensor) and isinstance(layer.base.weight, DTensor)
        assert layer.adapter.refresh_from_base(layer)
        torch.testing.assert_close(layer.adapter.magnitude.full_tensor(), reference.adapter.magnitude.detach())
        x = torch.randn(3, IN)
        y = layer(x)
        torch.testing.assert_close(y, reference(x), rtol=1e-6, atol=1e-6)
        y.square().sum().backward()
        assert layer.adapter.magnitude.grad is not None
        layer.eval()
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), reference(x), rtol=1e-6, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_compiles_without_graph_breaks(method):
    """`fullgraph=True` fails on any graph break: training forward/backward and eval forward trace whole."""
    layer = make_layer(method, {})
    randomize(layer)
    x = torch.randn(3, IN)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert all(p.grad is not None for p in layer.adapter.parameters())
    layer.eval()
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)
