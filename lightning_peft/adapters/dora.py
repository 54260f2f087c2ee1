"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

    V' = W0 + s B A,   n = ||V'||_row (detached),   W' = (m / n) * V'

Semantics follow HF peft exactly: the norm is over each output row of the `(out, in)`
weight and is treated as a constant (paper §4.3); dropout only hits the delta; the bias is
not rescaled; `m` starts at the row norm of the *current* effective weight, so the layer
equals its base (or its LoRA output, if B != 0) at initialisation.

Unlike peft, the training forward never builds an `out x in` matrix. The row norm uses

    n_i^2 = ||W0_i||^2 + 2 s <W0_i, (BA)_i> + s^2 ||(BA)_i||^2

where `W0 A^T` is an `(out, r)` product and `||(BA)_i||^2` needs only the `r x r` Gram
matrix `A A^T` (docs/methods.md). Nothing is cached from tensor addresses or version
counters, so the module is safe under sharding (DTensor), `.to()`, parameter reassignment
and `torch.compile`. The one cache, `m / n` for eager inference-mode forwards (generation
reuses it every token; compiled code recomputes it), is dropped explicitly: by
`train()`/`eval()`, `.to()`, `load_state_dict`, merge/unmerge, any forward with gradients,
and `invalidate_cache()` (call it after editing parameters in place outside those).
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import register_adapter
from .lora import LowRankFactors
from .sharded import assign_whole, whole

if TYPE_CHECKING:
    from .base import AdapterLinear


@torch.no_grad()
def dora_row_norms(w0: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, eps: float) -> Tensor:
    """Row norms of `W0 + s B A` (fp32, fp64 for fp64 bases; `(out,)`) without building `out x in`."""
    dtype = torch.promote_types(w0.dtype, torch.float32)
    a, b = lora_A.to(dtype), lora_B.to(dtype)  # (r, in), (out, r)
    if w0.dtype == torch.float16:  # fp16's range is small: the cross term could overflow
        w0a = F.linear(w0.to(dtype), a)  # (out, r) = W0 A^T
    else:
        w0a = F.linear(w0, lora_A.to(w0.dtype)).to(dtype)  # (out, r) = W0 A^T
    # n_i^2 - ||W0_i||^2 = sum_k B[i,k] * (2s (W0 A^T)[i,k] + s^2 (B A A^T)[i,k]): one addmm, one dot
    inner = torch.addmm(w0a, b, a @ a.t(), beta=2 * scaling, alpha=scaling * scaling)  # (out, r)
    base_sq = torch.linalg.vector_norm(w0, dim=1, dtype=dtype).square()  # one pass over W0: cheaper than W0 A^T
    n_sq = torch.linalg.vecdot(b, inner).add_(base_sq)
    return n_sq.clamp_min_(0).sqrt_().clamp_min_(eps)


@register_adapter
class DoRA(LowRankFactors):
    """DoRA with LoRA's hyper-parameters plus `eps`, the floor on row norms.

    Rows of W0 with zero norm would give `m / n = 0 / 0`; the floor keeps them finite and
    frozen at zero (their gradient is scaled by `m / n = 0`), with a warning at init.
    """

    method = "dora"
    parameter_roles = {"lora_A": "A", "lora_B": "B", "magnitude": "magnitude"}
    diagnostic_names = ("dora_scale_norm", "dora_lowrank_norm")

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
        # The value `m` was initialised to: `m` still equal to it was never trained nor restored. A plain
        # attribute, not a buffer: DDP would broadcast a buffer every step; it is compared on m's device.
        self.magnitude_at_init: Tensor | None = None
        self._merge_norm: Tensor | None = None
        self._eval_scale: Tensor | None = None
        self._eval_inputs: tuple = ()

    # -- the inference cache -------------------------------------------------------------

    def invalidate_cache(self) -> None:
        """Drop the cached `m / n` (call after editing parameters in place under inference mode)."""
        self._eval_scale, self._eval_inputs = None, ()

    def train(self, mode: bool = True) -> DoRA:
        self.invalidate_cache()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.invalidate_cache()  # device/dtype moves
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.invalidate_cache()  # runs for any load_state_dict on an enclosing module
        super()._load_from_state_dict(*args, **kwargs)

    def _cached_scale(self, weight: Tensor, w0: Tensor, dtype: torch.dtype) -> Tensor:
        """`m / n` in `dtype`, computed once per inference-mode phase for these very parameter objects."""
        live = (self.lora_A, self.lora_B, self.magnitude, weight)
        fresh = len(self._eval_inputs) == len(live) and all(
            ref() is t for ref, t in zip(self._eval_inputs, live, strict=True)
        )
        if not fresh or self._eval_scale is None or self._eval_scale.dtype != dtype:
            self._eval_scale = (self.magnitude / self.weight_norm(w0)).to(dtype)
            self._eval_inputs = tuple(weakref.ref(t) for t in live)
        return self._eval_scale

    # -- norms and the magnitude ---------------------------------------------------------

    def weight_norm(self, w0: Tensor) -> Tensor:
        """Row norms of `W0 + s B A` (fp32 or fp64, `(out,)`) without materialising `out x in`."""
        return dora_row_norms(w0, self.lora_A, self.lora_B, self.scaling, self.eps)

    def init_from_base(self, layer: AdapterLinear) -> None:
        self.reset_magnitude(layer)

    @torch.no_grad()
    def _magnitude_from(self, layer: AdapterLinear) -> Tensor:
        """Row norms of the current effective weight (whole `(out,)`), zero rows at 0.

        Under FSDP2 each rank takes the norms of its own rows of the base; only the norms are gathered.
        """
        w_rows, rows = layer.base_weight_rows()
        norm = dora_row_norms(w_rows, whole(self.lora_A), whole(self.lora_B)[rows], self.scaling, self.eps)
        norm = layer.gather_rows(norm, rows)
        zero_rows = int((norm <= self.eps).sum())
        if zero_rows:
            name = getattr(layer, "name", "") or f"{self.in_features}->{self.out_features} layer"
            warnings.warn(
                f"DoRA: {zero_rows} weight row(s) of {name} have zero norm; they are floored at eps={self.eps} "
                "and stay at zero during training",
                stacklevel=3,
            )
        return torch.where(norm <= self.eps, torch.zeros_like(norm), norm)

    @torch.no_grad()
    def reset_magnitude(self, layer: AdapterLinear) -> None:
        """Set `m` to the row norm of the current effective weight (call after loading new W0)."""
        value = self._magnitude_from(layer)
        assign_whole(self.magnitude, value)
        self.magnitude_at_init = whole(self.magnitude).detach().clone()
        self.invalidate_cache()

    @torch.no_grad()
    def refresh_from_base(self, layer: AdapterLinear) -> bool:
        """Re-initialise `m` when it still holds its init value but W0 (or A, B) changed since.

        Covers pretrained weights loaded after injection (e.g. in `LightningModule.setup`): the
        magnitude must be the row norm of the weights actually trained on. A trained or
        checkpoint-restored `m` differs from its init value and is never touched. Compares
        values, never addresses, so it is exact under sharding (gathers: call on every rank).
        """
        m0 = self.magnitude_at_init
        m = whole(self.magnitude).detach()
        if m0 is None or m0.shape != m.shape or not torch.equal(m, m0.to(m.device, m.dtype)):
            return False
        value = self._magnitude_from(layer).to(m.dtype)
        if torch.equal(value, m):
            return False
        assign_whole(self.magnitude, value)
        self.magnitude_at_init = whole(self.magnitude).detach().clone()
        self.invalidate_cache()
        return True

    @torch.no_grad()
    def restart(self, layer: AdapterLinear, cycle: int, generator: torch.Generator) -> None:
        """A re-drawn, B zero, and `m` the row norms of the merged weight: `m / ||W'|| W' = W'`."""
        self.reset_parameters(generator)
        self._merge_norm = None
        self.reset_magnitude(layer)

    # -- forward and merge ---------------------------------------------------------------

    def forward(self, x: Tensor, base_out: Tensor, layer: AdapterLinear) -> Tensor:
        """`y = c * (W0 x_d + s B A x_d) + rest`, with `rest = b` (no dropout) or `W0 x + b - W0 x_d`.

        This equals peft's `base + (c - 1) W0 x_d + c s B A x_d` but saves one `T x out`
        tensor for backward instead of two (`_ScaleRows`), and reuses the base output when
        there is no dropout (docs/methods.md).
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
            if self._eval_scale is not None:
                self.invalidate_cache()  # a forward with gradients may be followed by an update
            y = _ScaleRows.apply(z, self.magnitude, self.weight_norm(w0))
        elif not self.training and not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            y = z * self._cached_scale(layer.base.weight, w0, z.dtype)
        else:
            y = z * (self.magnitude / self.weight_norm(w0)).to(z.dtype)
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
        self.invalidate_cache()
        return (self.magnitude.to(weight.dtype) / n).unsqueeze(1) * v

    def merge_rows(self, weight_rows: Tensor, rows: slice) -> Tensor:
        """`(m_i / ||V_i||) V_i`, `V_i = W0_i + s (BA)_i`, for this rank's rows: the norms need no other rank."""
        v = weight_rows + self.low_rank_rows(rows).to(weight_rows.dtype)
        n = torch.linalg.vector_norm(v, dim=1).clamp_min(self.eps)
        return (whole(self.magnitude)[rows].to(weight_rows.dtype) / n).unsqueeze(1) * v

    def unmerge_weight(self, merged: Tensor) -> Tensor:
        if self._merge_norm is None:
            raise RuntimeError("DoRA layer was not merged in this process; cannot unmerge")
        self.invalidate_cache()
        m = self.magnitude.to(merged.dtype)
        safe_m = torch.where(m == 0, torch.ones_like(m), m)
        scale = (self._merge_norm.to(merged.dtype) / safe_m).unsqueeze(1)
        return merged * scale - self.low_rank_weight().to(merged.dtype)

    # -- diagnostics ---------------------------------------------------------------------

    @torch.no_grad()
    def row_update(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Rows of `V = W0 + sBA` (the direction) and the learned magnitude: `W'_i = m_i V_i / ||V_i||`."""
        dv_sq, dot, _ = super().row_update(weight)
        return dv_sq, dot, self.magnitude.detach()

    @torch.no_grad()
    def extra_diagnostics(self, weight: Tensor, row_norms: Tensor) -> dict[str, Tensor]:
        """Norms of `(c-1)⊙W0` and `c⊙sBA` (`c = m / ||W0 + sBA||_row`), from `(out, r)` products."""
        dtype = row_norms.dtype
        c = self.magnitude.detach().to(dtype) / self.weight_norm(weight.detach()).to(dtype)
        a, b = self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype)
        ba_sq = ((b @ (a @ a.t())) * b).sum(1).clamp_min(0)
        return {
            "dora_scale_norm": ((c - 1).square() * row_norms.square()).sum().sqrt(),
            "dora_lowrank_norm": (c.square() * ba_sq).sum().sqrt() * abs(self.scaling),
        }

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
