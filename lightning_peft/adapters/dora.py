"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

    V' = W0 + s B A,   n = ||V'||_row (detached),   W' = (m / n) * V'

Semantics follow HF peft exactly: the norm is over each output row of the `(out, in)`
weight and is treated as a constant (paper §4.3); dropout only hits the delta; the bias is
not rescaled; `m` starts at the row norm of the *current* effective weight, so the layer
equals its base (or its LoRA output, if B != 0) at initialisation.

Unlike peft, the training forward never builds an `out x in` matrix. The row norm uses

    n_i^2 = ||W0_i||^2 + 2 s <W0_i, (BA)_i> + s^2 ||(BA)_i||^2

where `A W0^T` is an `(r, out)` product, `||(BA)_i||^2` needs only the `r x r` Gram matrix
`A A^T`, and `||W0_i||^2` is cached (W0 is frozen). The scaled low-rank path is one autograd
function (`_DoRALowRank`) that scales in place and allocates one `T x out` tensor per
direction (docs/methods.md). Two caches, both for eager mode only (compiled code recomputes):

- `||W0_i||^2`, keyed on the base weight's identity, version counter, storage and dtype, and
  dropped by merge/unmerge, merge-and-restart, `load_state_dict`, `.to()` and
  `train()`/`eval()`;
- `m / n`, used whenever no gradient can flow (`torch.no_grad()`, inference mode, frozen
  adapters: generation reuses it every token), keyed the same way on `A`, `B`, `m` and `W0`,
  and dropped by the same events and by any forward with gradients.

Version counters see every in-place edit of a plain tensor (optimizer steps included), but
not edits through `.data` nor edits of FSDP2's sharded parameters (FSDP2 keeps the version of
the unsharded ones): call `invalidate_cache()` after such an edit made outside training.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import register_adapter
from .lora import LowRankFactors, lora_peft_mapping
from .sharded import assign_whole, is_dtensor, whole

if TYPE_CHECKING:
    from .base import AdapterLinear


def base_row_sq(w0: Tensor) -> Tensor:
    """`||W0_i||^2` per output row, fp32 (fp64 for fp64 bases): one pass over the frozen base."""
    return torch.linalg.vector_norm(w0, dim=1, dtype=torch.promote_types(w0.dtype, torch.float32)).square()


@torch.no_grad()
def dora_row_norms(
    w0: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, eps: float, base_sq: Tensor | None = None
) -> Tensor:
    """Row norms of `W0 + s B A` (fp32, fp64 for fp64 bases; `(out,)`) without building `out x in`.

    `base_sq` is `base_row_sq(w0)` when the caller has it cached (W0 is frozen).
    """
    dtype = torch.promote_types(w0.dtype, torch.float32)
    a, b = lora_A.to(dtype), lora_B.to(dtype)  # (r, in), (out, r)
    # `A W0^T` as `(r, in) @ (in, out)`: on CPU BLAS this layout of the skinny product is about 2x faster
    if w0.dtype == torch.float16:  # fp16's range is small: the cross term could overflow
        aw0 = a @ w0.to(dtype).t()  # (r, out)
    else:
        aw0 = (lora_A.to(w0.dtype) @ w0.t()).to(dtype)  # (r, out)
    # n_i^2 - ||W0_i||^2 = sum_k B[i,k] * (2s (W0 A^T)[i,k] + s^2 (B A A^T)[i,k]): one addmm, one dot
    inner = torch.addmm(aw0.t(), b, a @ a.t(), beta=2 * scaling, alpha=scaling * scaling)  # (out, r)
    n_sq = torch.linalg.vecdot(b, inner).add_(base_row_sq(w0) if base_sq is None else base_sq)
    return n_sq.clamp_min_(0).sqrt_().clamp_min_(eps)  # cancellation can leave n_sq slightly below 0


def _stamp(tensors: tuple[Tensor, ...]) -> tuple | None:
    """What identifies these tensors' values in eager mode: object, version, storage, dtype.

    `None` (never cache) for inference tensors (no version counter) and sharded DTensors.
    In-place edits bump the version; `.to()`/`.data =` change the storage or dtype.
    """
    if any(t.is_inference() or is_dtensor(t) for t in tensors):
        return None
    return tuple((weakref.ref(t), t._version, t.data_ptr(), t.dtype) for t in tensors)


def _still(stamp: tuple | None, tensors: tuple[Tensor, ...]) -> bool:
    """Whether `tensors` are the very tensors, unchanged, that `stamp` was taken of."""
    if stamp is None or len(stamp) != len(tensors):
        return False
    return all(
        ref() is t and version == t._version and ptr == t.data_ptr() and dtype == t.dtype
        for (ref, version, ptr, dtype), t in zip(stamp, tensors, strict=True)
    )


@register_adapter
class DoRA(LowRankFactors):
    """DoRA with LoRA's hyper-parameters plus `eps`, the floor on row norms.

    Rows of W0 with zero norm would give `m / n = 0 / 0`; the floor keeps them finite and
    frozen at zero (their gradient is scaled by `m / n = 0`), with a warning at init.
    """

    method = "dora"
    label = "DoRA"
    suggest_roles = frozenset({"magnitude"})
    peft = lora_peft_mapping(use_dora=True)  # `eps` has no peft field: exports carry the default's behaviour
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
        self._eval_scale: Tensor | None = None  # `m / n`, reused while no gradient can flow
        self._eval_stamp: tuple | None = None
        self._base_sq: Tensor | None = None  # `||W0_i||^2`: W0 is frozen, so computed once
        self._base_stamp: tuple | None = None

    # -- caches --------------------------------------------------------------------------

    def invalidate_cache(self) -> None:
        """Drop the cached `m / n` and `||W0_i||^2` (call after editing parameters through `.data`
        or sharded parameters by hand; in-place edits of plain tensors are noticed)."""
        self._eval_scale, self._eval_stamp = None, None
        self._base_sq, self._base_stamp = None, None

    def train(self, mode: bool = True) -> DoRA:
        self.invalidate_cache()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.invalidate_cache()  # device/dtype moves
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.invalidate_cache()  # runs for any load_state_dict on an enclosing module
        super()._load_from_state_dict(*args, **kwargs)

    def _cached_base_sq(self, layer: AdapterLinear, w0: Tensor) -> Tensor | None:
        """`||W0_i||^2` for eager forwards, recomputed when the base weight changes; None when compiling."""
        if torch.compiler.is_compiling():
            return None  # compiled code recomputes it (one fused pass); no Python state in the graph
        live = (layer.base.weight,)
        if self._base_sq is None or not _still(self._base_stamp, live):
            self._base_sq, self._base_stamp = base_row_sq(w0.detach()), _stamp(live)
        return self._base_sq

    def _cached_scale(self, layer: AdapterLinear, w0: Tensor, dtype: torch.dtype) -> Tensor:
        """`m / n` in `dtype`, reused while these very parameters keep their values (eager, no gradient)."""
        live = (self.lora_A, self.lora_B, self.magnitude, layer.base.weight)
        if self._eval_scale is None or self._eval_scale.dtype != dtype or not _still(self._eval_stamp, live):
            self._eval_scale = (self.magnitude / self._norm(layer, w0)).to(dtype)
            self._eval_stamp = _stamp(live)
        return self._eval_scale

    # -- norms and the magnitude ---------------------------------------------------------

    def weight_norm(self, w0: Tensor) -> Tensor:
        """Row norms of `W0 + s B A` (fp32 or fp64, `(out,)`) without materialising `out x in`."""
        return dora_row_norms(w0, self.lora_A, self.lora_B, self.scaling, self.eps)

    def _norm(self, layer: AdapterLinear, w0: Tensor) -> Tensor:
        """`weight_norm(w0)` with `||W0_i||^2` from the cache (the forward's route)."""
        base_sq = self._cached_base_sq(layer, w0)
        return dora_row_norms(w0, self.lora_A, self.lora_B, self.scaling, self.eps, base_sq)

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
        self.invalidate_cache()  # fit start: W0 may have been loaded by any route since the last forward
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

        This equals peft's `base + (c - 1) W0 x_d + c s B A x_d`, but keeps one `T x out`
        tensor for backward instead of two and allocates one fewer in each direction
        (`_DoRALowRank`), and reuses the base output when there is no dropout (docs/methods.md).
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
        x_flat, p_flat = x_d.reshape(-1, x_d.shape[-1]), plain.reshape(-1, plain.shape[-1])
        a, b = self.lora_A.to(x_d.dtype), self.lora_B.to(plain.dtype)
        if self._gradient_can_flow(x_d, plain):
            self._eval_scale = None  # a forward with gradients may be followed by an update
            norm = self._norm(layer, w0)
            y = _DoRALowRank.apply(x_flat, p_flat, a, b, self.magnitude, norm, self.scaling)
        else:  # no_grad, inference_mode, or frozen adapters (generation): `m / n` once per parameter values
            if torch.compiler.is_compiling():
                scale = (self.magnitude / self.weight_norm(w0)).to(plain.dtype)
            else:
                scale = self._cached_scale(layer, w0, plain.dtype)
            y = _low_rank_sum(x_flat, p_flat, a, b, self.scaling).mul_(scale)
        y = y.view(plain.shape)
        return y if rest is None else y + rest

    def _gradient_can_flow(self, x_d: Tensor, plain: Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return any(t.requires_grad for t in (self.magnitude, self.lora_A, self.lora_B, x_d, plain))

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


def _low_rank_sum(x: Tensor, plain: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """`plain + s (x A^T) B^T` for `(N, in)`/`(N, out)` inputs, a new tensor.

    `x A^T` is computed as `(A x^T)^T`: with `r` as the rows of the skinny product, CPU BLAS
    runs it up to 2x faster (the values are the same products, summed in another order).
    """
    h = torch.mm(a, x.t()).t().to(plain.dtype)  # (N, r), stored r-major
    return torch.addmm(plain, h, b.t(), alpha=scaling)


class _DoRALowRank(torch.autograd.Function):
    """`y = c * (P + s (x A^T) B^T)` per output column, `c = m / n`, for `P = W0 x` (flat `(N, .)`).

    `n` is DoRA's detached norm: it gets no gradient (paper §4.3). Against autograd on the
    plain expression this keeps one `T x out` tensor (`P`; not `z` and `c * z`), scales in
    place, allocates one `T x out` tensor in backward (`grad * P`, then reused for
    `grad * c`), splits `sum_t grad * z` as `sum_t grad * P + s rowsum(B * (grad^T H))` with
    `grad^T H` being `B`'s gradient anyway, and lays out the skinny products with `r` as
    the rows (`(r, N) @ (N, out)`), which CPU BLAS runs 2-4x faster than `(out, N) @ (N, r)`.
    """

    @staticmethod
    def forward(ctx, x, plain, lora_A, lora_B, magnitude, norm, scaling):
        h_t = torch.mm(lora_A, x.t()).to(plain.dtype)  # (r, N) = (x A^T)^T
        scale = (magnitude / norm).to(plain.dtype)
        ctx.save_for_backward(x, plain, h_t, lora_A, lora_B, scale, norm)
        ctx.scaling = scaling
        return torch.addmm(plain, h_t.t(), lora_B.t(), alpha=scaling).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, plain, h_t, lora_A, lora_B, scale, norm = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_plain, need_a, need_b, need_m = ctx.needs_input_grad[:5]
        grad_x = grad_plain = grad_a = grad_b = grad_m = buffer = None
        if need_m:
            buffer = grad * plain
            grad_m = buffer.sum(0, dtype=norm.dtype)  # sum_t grad * P; the low-rank part is added below
        if need_plain or need_x or need_a:
            grad_plain = grad * scale if buffer is None else torch.mul(grad, scale, out=buffer)
        if need_b or need_m:
            g_h = torch.mm(h_t, grad).t()  # (out, r) = grad^T H
            if need_b:
                grad_b = g_h * (scale * s).unsqueeze(1)
            if need_m:
                low_rank = torch.linalg.vecdot(lora_B.to(norm.dtype), g_h.to(norm.dtype))
                grad_m = grad_m.add_(low_rank, alpha=s).div_(norm)
        if need_x or need_a:
            grad_h_t = torch.mm(lora_B.t(), grad_plain.t()).mul_(s).to(x.dtype)  # (r, N)
            grad_a = torch.mm(grad_h_t, x) if need_a else None
            grad_x = torch.mm(grad_h_t.t(), lora_A) if need_x else None
        return grad_x, (grad_plain if need_plain else None), grad_a, grad_b, grad_m, None, None
