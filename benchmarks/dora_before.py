"""DoRA's training forward as it was before the fast-norm work (commit 737802d), for benchmarks only.

`step_time.py --dora-before` swaps these classes into injected DoRA layers so the old and
new forwards run interleaved in one process. Same math, same parameters; only the route
differs: `W0 A^T` in the `(out, in) @ (in, r)` layout, `||W0_i||^2` recomputed every
forward, a separate `z * c` tensor, and a backward that allocates `grad * c` and `grad * z`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.adapters import DoRA


@torch.no_grad()
def row_norms_before(w0: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, eps: float) -> Tensor:
    dtype = torch.promote_types(w0.dtype, torch.float32)
    a, b = lora_A.to(dtype), lora_B.to(dtype)
    if w0.dtype == torch.float16:
        w0a = F.linear(w0.to(dtype), a)
    else:
        w0a = F.linear(w0, lora_A.to(w0.dtype)).to(dtype)
    inner = torch.addmm(w0a, b, a @ a.t(), beta=2 * scaling, alpha=scaling * scaling)
    base_sq = torch.linalg.vector_norm(w0, dim=1, dtype=dtype).square()
    n_sq = torch.linalg.vecdot(b, inner).add_(base_sq)
    return n_sq.clamp_min_(0).sqrt_().clamp_min_(eps)


class ScaleRowsBefore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
        scale = (magnitude / norm).to(z.dtype)
        ctx.save_for_backward(z, scale, norm)
        return z * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        z, scale, norm = ctx.saved_tensors
        grad_z = grad * scale if ctx.needs_input_grad[0] else None
        grad_m = None
        if ctx.needs_input_grad[1]:
            flat = (grad * z).reshape(-1, z.shape[-1])
            grad_m = flat.sum(0, dtype=norm.dtype) / norm
        return grad_z, grad_m, None


class DoRABefore(DoRA):
    """The old training forward (the eval path is the old one too: no cache outside inference mode)."""

    def forward(self, x: Tensor, base_out: Tensor, layer) -> Tensor:
        w0 = layer.base_weight()
        bias = layer.bias
        if isinstance(self.dropout, nn.Identity) or not self.training:
            x_d, rest = x, bias
            plain = base_out if bias is None else base_out - bias
        else:
            x_d = self.dropout(x)
            plain = F.linear(x_d, w0)
            rest = base_out - plain
        z = self.add_lora_delta(plain, x_d)
        norm = row_norms_before(w0, self.lora_A, self.lora_B, self.scaling, self.eps)
        if torch.is_grad_enabled() and (self.magnitude.requires_grad or z.requires_grad):
            y = ScaleRowsBefore.apply(z, self.magnitude, norm)
        else:
            y = z * (self.magnitude / norm).to(z.dtype)
        return y if rest is None else y + rest


def use_dora_before(model: nn.Module) -> nn.Module:
    """Switch every DoRA adapter in `model` to the old forward (in place); returns `model`."""
    for module in model.modules():
        if type(module) is DoRA:
            module.__class__ = DoRABefore
    return model
