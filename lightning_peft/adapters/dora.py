"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

    V' = W0 + s B A,   n = ||V'||_row (detached),   W' = (m / n) * V'

Semantics follow HF peft exactly (reference/dora.md §1): the norm is over each output row of
the `(out, in)` weight and is treated as a constant (paper §4.3); dropout only hits the
delta; the bias is not rescaled; `m` starts at the row norm of the *current* effective
weight, so the layer equals its base (or its LoRA output, if B != 0) at initialisation.

Unlike peft, the training forward never builds an `out x in` matrix. The row norm uses

    n_i^2 = ||W0_i||^2 + 2 s <W0_i, (BA)_i> + s^2 ||(BA)_i||^2

where `||W0_i||^2` is cached (W0 is frozen), `W0 A^T` is an `(out, r)` product and
`||(BA)_i||^2` needs only the `r x r` Gram matrix `A A^T` (reference/dora.md §1.5).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import register_adapter
from .lora import LowRankFactors

if TYPE_CHECKING:
    from .base import AdapterLinear


@register_adapter
class DoRA(LowRankFactors):
    """DoRA with LoRA's hyper-parameters plus `eps`, the floor on row norms.

    Rows of W0 with zero norm would give `m / n = 0 / 0`; the floor keeps them finite and
    frozen at zero (their gradient is scaled by `m / n = 0`), with a warning at init.
    """

    method = "dora"
    parameter_roles = {"lora_A": "A", "lora_B": "B", "magnitude": "magnitude"}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(in_features, out_features, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        if isinstance(eps, bool) or not isinstance(eps, int | float) or eps <= 0:
            raise ValueError(f"`eps` must be a positive number, got {eps!r}")
        self.eps = float(eps)
        # fp32 master copy regardless of the base dtype; cast to the activations' dtype in forward.
        self.magnitude = nn.Parameter(torch.ones(out_features))  # (out,)
        self._w0_sq: Tensor | None = None
        self._w0_key: tuple | None = None
        self._merge_norm: Tensor | None = None
        self._eval_scale: Tensor | None = None
        self._eval_key: tuple | None = None
        self._init_state: tuple | None = None

    @classmethod
    def count_parameters(cls, in_features: int, out_features: int, **hparams: Any) -> int:
        return super().count_parameters(in_features, out_features, **hparams) + out_features

    def _apply(self, fn, recurse=True):
        # Device/dtype moves invalidate the cached norms.
        self._w0_sq = self._w0_key = self._eval_scale = self._eval_key = None
        return super()._apply(fn, recurse)

    # -- norms ---------------------------------------------------------------------------

    def _base_row_sq(self, w0: Tensor) -> Tensor:
        """`||W0_i||^2` in fp32 (fp64 for fp64 bases), recomputed only when W0 changes (tracked by its version)."""
        key = (w0.data_ptr(), w0._version, w0.dtype, w0.device)
        if self._w0_key != key or self._w0_sq is None:
            dtype = torch.promote_types(w0.dtype, torch.float32)
            self._w0_sq = torch.linalg.vector_norm(w0, dim=1, dtype=dtype).square()
            self._w0_key = key
        return self._w0_sq

    @torch.no_grad()
    def weight_norm(self, w0: Tensor) -> Tensor:
        """Row norms of `W0 + s B A` (fp32 or fp64, `(out,)`) without materialising `out x in`."""
        dtype = torch.promote_types(w0.dtype, torch.float32)
        a = self.lora_A.to(dtype)  # (r, in)
        b = self.lora_B.to(dtype)  # (out, r)
        s = self.scaling
        if w0.dtype == torch.float16:  # fp16's range is small: the cross term could overflow
            w0a = F.linear(w0.to(dtype), a)  # (out, r) = W0 A^T
        else:
            w0a = F.linear(w0, self.lora_A.to(w0.dtype)).to(dtype)  # (out, r) = W0 A^T
        # n_i^2 - ||W0_i||^2 = sum_k B[i,k] * (2s (W0 A^T)[i,k] + s^2 (B A A^T)[i,k]): one addmm, one dot
        inner = torch.addmm(w0a, b, a @ a.t(), beta=2 * s, alpha=s * s)  # (out, r)
        n_sq = torch.linalg.vecdot(b, inner).add_(self._base_row_sq(w0))
        return n_sq.clamp_min_(0).sqrt_().clamp_min_(self.eps)

    def init_from_base(self, layer: AdapterLinear) -> None:
        self.reset_magnitude(layer)

    @torch.no_grad()
    def reset_magnitude(self, layer: AdapterLinear) -> None:
        """Set `m` to the row norm of the current effective weight (call after loading new W0)."""
        w0 = layer.base_weight()
        norm = self.weight_norm(w0)
        zero_rows = int((norm <= self.eps).sum())
        if zero_rows:
            name = getattr(layer, "name", "") or f"{self.in_features}->{self.out_features} layer"
            warnings.warn(
                f"DoRA: {zero_rows} weight row(s) of {name} have zero norm; they are floored at eps={self.eps} "
                "and stay at zero during training",
                stacklevel=2,
            )
        self.magnitude.copy_(torch.where(norm <= self.eps, torch.zeros_like(norm), norm))
        self._init_state = (w0.data_ptr(), w0._version, self.magnitude.detach().clone())

    @torch.no_grad()
    def refresh_if_base_changed(self, layer: AdapterLinear) -> bool:
        """Re-initialise `m` when W0 changed since init and `m` was never trained or restored.

        Covers pretrained weights loaded after injection (e.g. in `LightningModule.setup`): the
        magnitude must be the row norm of the weights actually trained on. A trained or
        checkpoint-restored `m` differs from its init value and is never touched.
        """
        if self._init_state is None:
            return False
        ptr, version, m0 = self._init_state
        w0 = layer.base_weight()
        if (w0.data_ptr(), w0._version) == (ptr, version) or not torch.equal(self.magnitude.detach(), m0):
            return False
        self.reset_magnitude(layer)
        return True

    def scale(self, w0: Tensor, dtype: torch.dtype) -> Tensor:
        """`c = m / n` as an `(out,)` vector in the activations' dtype; cached in eval mode."""
        if self.training or torch.is_grad_enabled():
            return (self.magnitude / self.weight_norm(w0)).to(dtype)
        key = (
            self.lora_A._version,
            self.lora_B._version,
            self.magnitude._version,
            w0.data_ptr(),
            w0._version,
            dtype,
        )
        if self._eval_key != key or self._eval_scale is None:
            self._eval_scale = (self.magnitude / self.weight_norm(w0)).to(dtype)
            self._eval_key = key
        return self._eval_scale

    # -- forward and merge ---------------------------------------------------------------

    def forward(self, x: Tensor, base_out: Tensor, layer: AdapterLinear) -> Tensor:
        """`y = c * (W0 x_d + s B A x_d) + rest`, with `rest = b` (no dropout) or `W0 x + b - W0 x_d`.

        This equals peft's `base + (c - 1) W0 x_d + c s B A x_d` but saves one `T x out`
        tensor for backward instead of two (`_ScaleRows`), and reuses the base output when
        there is no dropout (reference/dora.md §1.5 items 6-7).
        """
        w0 = layer.base_weight()
        bias = layer.bias
        if isinstance(self.dropout, nn.Identity) or not self.training:
            x_d = x
            plain = base_out if bias is None else base_out - bias  # reuse: no second base matmul
            rest = bias
        else:
            x_d = self.dropout(x)
            plain = F.linear(x_d, w0)  # peft semantics: dropout only on the delta
            rest = base_out - plain
        z = self.add_lora_delta(plain, x_d)  # W0 x_d + s B A x_d
        if torch.is_grad_enabled() and (self.magnitude.requires_grad or z.requires_grad):
            y = _ScaleRows.apply(z, self.magnitude, self.weight_norm(w0))
        else:
            y = z * self.scale(w0, z.dtype)
        return y if rest is None else y + rest

    def _direction(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        v = weight + self.low_rank_weight().to(weight.dtype)  # (out, in)
        n = torch.linalg.vector_norm(v, dim=1).clamp_min(self.eps)
        return v, n

    def delta_weight(self, weight: Tensor) -> Tensor:
        v, n = self._direction(weight)
        return (self.magnitude.to(weight.dtype) / n).unsqueeze(1) * v - weight

    def merge_weight(self, weight: Tensor) -> Tensor:
        v, n = self._direction(weight)
        self._merge_norm = n  # n cannot be recovered from the merged weight (peft does the same)
        return (self.magnitude.to(weight.dtype) / n).unsqueeze(1) * v

    def unmerge_weight(self, merged: Tensor) -> Tensor:
        if self._merge_norm is None:
            raise RuntimeError("DoRA layer was not merged in this process; cannot unmerge")
        m = self.magnitude.to(merged.dtype)
        safe_m = torch.where(m == 0, torch.ones_like(m), m)
        scale = (self._merge_norm.to(merged.dtype) / safe_m).unsqueeze(1)
        return merged * scale - self.low_rank_weight().to(merged.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


class _ScaleRows(torch.autograd.Function):
    """`y = z * (m / n)` over the last dim, saving only `z` (and two `(out,)` vectors).

    `n` is DoRA's detached norm: it gets no gradient (paper §4.3). Autograd on the plain
    expression would also keep `m / n`'s operands; the win over peft's formula is that
    `W0 x` and `B A x` are not both kept.
    """

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
