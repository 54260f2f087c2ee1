"""Exact singular values of adapter updates without the dense `out x in` SVD, and per-module probes.

Cheap routes (each checked against `torch.linalg.svdvals` of the dense update in the tests):

- **LoRA** `dW = s B A`: with `B = Q_B R_B`, `A^T = Q_A R_A` (reduced QR),
  `sigma(dW) = s * sigma(R_B R_A^T)`: an `r x r` problem.
- **MoRA types 1-4** (`sharing`, `type2`, `type3`, `type4`): `dW = D M C` with fixed 0/1 maps
  `D (out x R)` (one 1 per row) and `C (R x in)` (reference/mora.md §4.2). Then
  `sigma(dW) = sigma(G_D^1/2 M G_C^1/2)` with the `R x R` Grams `G_D = D^T D` (diagonal: how
  many outputs read each entry of `u`) and `G_C = C C^T` (diagonal, except for wrap padding).
  Proof: the non-zero eigenvalues of `C^T X C` equal those of `G_C^1/2 X G_C^1/2`.
  For `sharing` with `in = b R`, `out = a R` this is `dW = J_{a x b} (x) M` and
  `sigma(dW) = sqrt(a b) sigma(M)`.
- **MoRA `rope` / `decouple`**: `dW` repeats rows of `W~ = fold(blockdiag(M Rot_i))`, so
  `sigma(dW) = sigma(diag(sqrt(cnt)) W~)` (`cnt[p]` = outputs that copy row `p`). Blocks that
  the wrap padding does not fold are independent and `Rot_i` is orthogonal, so each gives
  `sigma(diag(sqrt(cnt_i)) M)`; identical `cnt_i` are solved once. With padding, blocks 0 and
  `n-1` share columns and form one `2R x (2R - pad)` problem.
- **MoRA `truncation`**: the corner block of `M`.

Everything else (DoRA, whose update `(c-1)⊙W0 + c⊙sBA` is full rank; `full` modules; unknown
methods) uses `svdvals` of the dense fp32 update.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..adapters.base import AdapterLinear
from ..adapters.dora import DoRA
from ..adapters.lora import LoRA
from ..adapters.mora import MoRA, block_index, rotate_half
from .metrics import (
    DORA_METRICS,
    DRIFT_METRICS,
    SPECTRAL_METRICS,
    acc_dtype,
    magnitude_drift,
    row_direction_change,
    spectrum_metrics,
)

OnError = Callable[[str, BaseException], None]


def dense_singular_values(dw: Tensor) -> Tensor:
    """`torch.linalg.svdvals` in fp32 (a 1-D update is a diagonal map: its values are `|dw|`)."""
    dw = dw.detach().float()
    return dw.abs() if dw.ndim == 1 else torch.linalg.svdvals(dw)


def lora_singular_values(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """Singular values of `scaling * B @ A` from two thin QRs and an `r x r` SVD."""
    dtype = acc_dtype(lora_A.device)
    _, r_b = torch.linalg.qr(lora_B.detach().to(dtype))  # (min(out, r), r)
    _, r_a = torch.linalg.qr(lora_A.detach().to(dtype).t())  # (min(in, r), r)
    return torch.linalg.svdvals(r_b @ r_a.t()) * abs(scaling)


def _psd_sqrt(g: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(g)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.t()


def _mora_grams(ad: MoRA, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`(sqrt of diag(G_D) as (R,), G_C^1/2 as (R, R))` for the types 1-4 (fixed per layer)."""
    d, k, r_hat, n, v = ad.out_features, ad.in_features, ad.r_hat, ad.chunks, ad.variant
    rows = torch.arange(d, device=device) % r_hat if v in ("sharing", "type3") else block_index(d, r_hat, device)
    row_w = torch.bincount(rows, minlength=r_hat).to(dtype).sqrt()
    if v in ("type2", "type3"):  # contiguous compression: one 1 per column, G_C diagonal
        cols = torch.bincount(block_index(k, r_hat, device), minlength=r_hat).to(dtype)
        return row_w, torch.diag(cols.sqrt())
    padded = torch.arange(n * r_hat, device=device)  # strided with wrap padding: p feeds z_{p mod R}
    c = torch.zeros(r_hat, k, dtype=dtype, device=device)
    c.index_put_((padded % r_hat, padded % k), torch.ones_like(padded, dtype=dtype), accumulate=True)
    return row_w, _psd_sqrt(c @ c.t())


def _rope_block(ad: MoRA, m: Tensor, i: int) -> Tensor:
    """`P_i = M Rot_i` exactly as `MoRA.delta_weight` builds it."""
    if ad.variant == "decouple" or i == 0:
        return m
    eye = torch.eye(ad.r_hat, dtype=m.dtype, device=m.device)
    rot = eye * ad.rope_cos[i].to(m.dtype) + rotate_half(eye) * ad.rope_sin[i].to(m.dtype)
    return m @ rot.t()


def _rope_singular_values(ad: MoRA, m: Tensor) -> Tensor:
    d, k, r_hat, n = ad.out_features, ad.in_features, ad.r_hat, ad.chunks
    period, pad = n * r_hat, n * r_hat - k
    p = torch.arange(period, device=m.device)
    cnt = (d // period + (p < d % period).long()).to(m.dtype).reshape(n, r_hat)  # copies of each W~ row
    weights = cnt.sqrt()
    parts = []
    if pad and n == 1:  # one block folded onto itself: R x k, small
        folded = torch.zeros(r_hat, k, dtype=m.dtype, device=m.device).index_add_(1, p % k, m)
        return torch.linalg.svdvals(weights[0, :, None] * folded)
    independent = range(n) if not pad else range(1, n - 1)
    if len(independent):
        unique, counts = torch.unique(weights[list(independent)], dim=0, return_counts=True)
        sv = torch.linalg.svdvals(unique[:, :, None] * m)  # (u, R): sigma(diag(w) M Rot) = sigma(diag(w) M)
        parts.append(sv.repeat_interleave(counts, dim=0).flatten())
    if pad:  # blocks 0 and n-1 share the first `pad` columns
        last = _rope_block(ad, m, n - 1)
        joint = torch.zeros(2 * r_hat, 2 * r_hat - pad, dtype=m.dtype, device=m.device)
        joint[:r_hat, :r_hat] = m
        joint[r_hat:, r_hat:] = last[:, : r_hat - pad]
        joint[r_hat:, :pad] += last[:, r_hat - pad :]
        w = torch.cat([weights[0], weights[n - 1]])
        parts.append(torch.linalg.svdvals(w[:, None] * joint))
    return torch.cat(parts)


class _MoRASpectrum:
    """Cheap MoRA singular values; caches the fixed Gram roots of types 1-4."""

    def __init__(self) -> None:
        self._grams: tuple[Tensor, Tensor] | None = None

    def __call__(self, ad: MoRA) -> Tensor | None:
        m = ad.mora_M.detach().to(acc_dtype(ad.mora_M.device))
        v = ad.variant
        if v in ("sharing", "type2", "type3", "type4"):
            if self._grams is None or self._grams[0].device != m.device:
                self._grams = _mora_grams(ad, m.device, m.dtype)
            row_w, col_root = self._grams
            return torch.linalg.svdvals(row_w[:, None] * m @ col_root)
        if v in ("rope", "decouple"):
            return _rope_singular_values(ad, m)
        if v == "truncation":
            return torch.linalg.svdvals(m[: ad.out_features, : ad.in_features])
        return None


def mora_singular_values(adapter: MoRA) -> Tensor | None:
    """Exact singular values of a MoRA update from `R x R` problems; `None` for unknown variants."""
    return _MoRASpectrum()(adapter)


class UpdateProbe:
    """Measures one tracked module: the update, its spectrum and its row drift.

    `W0` statistics (`||W0||_F`, `sigma_1(W0)`, row norms) are computed once and recomputed
    only when the frozen weight changes in place (a merge). `full` modules keep a copy of
    their starting weight; adapters read `W0` from their frozen base (no copy).

    Args:
        name: normalised module name.
        block: block depth, or `None` outside the blocks.
        kind: name inside the block.
        method: `lora`, `dora`, `mora`, `full`, ...
        module: the `AdapterLinear`, or the module owning a trained `weight` (`full`).
        transpose: the `full` weight is stored `(in, out)` (GPT-2 `Conv1D`).
        snapshot: copy a `full` module's starting weight (off for a probe that only names it).
    """

    def __init__(
        self,
        name: str,
        block: int | None,
        kind: str,
        method: str,
        module: nn.Module,
        transpose: bool = False,
        snapshot: bool = True,
    ) -> None:
        self.name, self.block, self.kind, self.method = name, block, kind, method
        self.module = module
        self.transpose = transpose
        self.is_adapter = isinstance(module, AdapterLinear)
        self._start: Tensor | None = None
        if not self.is_adapter and snapshot:
            self._start = module.weight.detach().clone()  # only `full` modules are copied
        self._w0_key: tuple | None = None
        self._w0_stats: tuple[Tensor, Tensor, Tensor] | None = None
        self._mora = _MoRASpectrum()

    @property
    def _stored(self) -> Tensor:
        if self.is_adapter:
            return self.module.base.weight
        if self._start is None:
            raise RuntimeError(f"UpdateProbe {self.name!r} was built with snapshot=False and cannot measure")
        return self._start

    @property
    def size(self) -> int:
        return max(self._stored.shape)

    @property
    def device(self) -> torch.device:
        return self._stored.device

    def parameters(self) -> list[nn.Parameter]:
        """The trained tensors of this module (for gradient norms)."""
        owner = self.module.adapter if self.is_adapter else self.module
        return [p for p in owner.parameters(recurse=self.is_adapter) if p.requires_grad]

    def _current(self) -> Tensor:
        w = self.module.weight.detach()
        return w.t() if self.transpose and w.ndim == 2 else w

    def _w0(self) -> Tensor:
        """`W0` as `(out, in)` (or `(n,)` for a 1-D `full` weight), in its stored dtype."""
        if not self.is_adapter:
            assert self._start is not None
            return self._start.t() if self.transpose and self._start.ndim == 2 else self._start
        w = self.module.base_weight().detach()
        if self.module.merged:
            w = self.module.adapter.unmerge_weight(w.to(self.module.adapter_dtype))
        return w

    def w0_stats(self, w0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`(||W0||_F, sigma_1(W0), row norms)`, cached until the stored weight changes."""
        src = self._stored
        key = (src.data_ptr(), src._version, src.device, self.is_adapter and self.module.merged)
        if self._w0_key != key or self._w0_stats is None:
            w = w0.float()
            if w.ndim == 1:  # a diagonal map (norm weights)
                stats = (w.norm(), w.abs().max(), w.abs())
            else:
                stats = (w.norm(), torch.linalg.matrix_norm(w, ord=2), w.norm(dim=1))
            dtype = acc_dtype(w.device)
            self._w0_stats = tuple(t.to(dtype) for t in stats)  # type: ignore[assignment]
            self._w0_key = key
        assert self._w0_stats is not None
        return self._w0_stats

    def singular_values(self) -> Tensor:
        """Singular values of this module's update (cheap route where one exists)."""
        if self.is_adapter:
            ad = self.module.adapter
            if isinstance(ad, LoRA):
                return lora_singular_values(ad.lora_A, ad.lora_B, ad.scaling)
            if isinstance(ad, MoRA):
                sv = self._mora(ad)
                if sv is not None:
                    return sv
        return dense_singular_values(self.delta())

    def delta(self) -> Tensor:
        """Dense fp32 update `W_eff - W0`."""
        if self.is_adapter:
            return self.module.delta_weight().float()
        return self._current().float() - self._w0().float()

    @torch.no_grad()
    def measure(self, on_error: OnError | None = None) -> dict[str, Tensor]:
        """Every metric of this module as 0-d tensors (NaN where a stage failed).

        Args:
            on_error: called with `(stage, exception)` when a stage fails; without it the
                exception propagates.
        """
        nan = torch.tensor(math.nan, dtype=torch.float64)
        out: dict[str, Tensor] = {}
        stages = [("spectrum", self._spectrum, SPECTRAL_METRICS), ("drift", self._drift, DRIFT_METRICS)]
        if self.is_adapter and isinstance(self.module.adapter, DoRA):
            stages.append(("dora parts", self._dora_parts, DORA_METRICS))
        for stage, fn, names in stages:
            try:
                out.update(fn())
            except Exception as err:  # diagnostics must never stop training
                if on_error is None:
                    raise
                on_error(f"{stage} ({', '.join(names)})", err)
                out.update(dict.fromkeys(names, nan))
        if "fro_norm" in out and "mag_drift" in out:  # a rounding-level update is zero everywhere
            zero = out["fro_norm"] == 0
            for name in (*DRIFT_METRICS, *DORA_METRICS):
                if name in out:
                    out[name] = torch.where(zero.to(out[name].device), torch.zeros_like(out[name]), out[name])
        return out

    def _spectrum(self) -> dict[str, Tensor]:
        fro0, sigma0, _rows = self.w0_stats(self._w0())
        return spectrum_metrics(self.singular_values(), fro0, sigma0, self.size)

    def _drift(self) -> dict[str, Tensor]:
        w0 = self._w0()
        _, _, n0 = self.w0_stats(w0)
        ad = self.module.adapter if self.is_adapter else None
        if isinstance(ad, LoRA | DoRA):
            # rows of V = W0 + sBA from (out, r) products: no out x in matrix
            a, b, s = ad.lora_A.float(), ad.lora_B.float(), ad.scaling
            cross = ((w0.float() @ a.t()) * b).sum(1)  # (out,) <W0_i, (BA)_i>
            dw_sq = s * s * ((b @ (a @ a.t())) * b).sum(1)  # (out,) ||s (BA)_i||^2
            dot = s * cross
        else:
            dw = self.delta()
            w0f = w0.float()
            dw_sq, dot = (dw.square(), dw * w0f) if dw.ndim == 1 else ((dw * dw).sum(1), (dw * w0f).sum(1))
        change = row_direction_change(dw_sq, dot, n0)  # (out,)
        if isinstance(ad, DoRA):  # W'_i = (m_i / ||V_i||) V_i: V's direction, flipped where m_i < 0
            m = ad.magnitude.to(change.dtype)
            change = torch.where(m > 0, change, torch.where(m < 0, 2 - change, torch.ones_like(change)))
            m_t = m
        else:
            m_t = (n0.square() + 2 * dot.to(n0.dtype) + dw_sq.to(n0.dtype)).clamp_min(0).sqrt()
        return {"mag_drift": magnitude_drift(m_t, n0), "dir_drift": change.mean()}

    def _dora_parts(self) -> dict[str, Tensor]:
        """Norms of `(c-1)⊙W0` and `c⊙sBA` (`c = m / ||W0 + sBA||_row`), from `(out, r)` products."""
        ad = self.module.adapter
        w0 = self._w0()
        _, _, n0 = self.w0_stats(w0)
        dtype = n0.dtype
        c = ad.magnitude.to(dtype) / ad.weight_norm(w0).to(dtype)
        a, b = ad.lora_A.to(dtype), ad.lora_B.to(dtype)
        ba_sq = ((b @ (a @ a.t())) * b).sum(1).clamp_min(0)
        return {
            "dora_scale_norm": ((c - 1).square() * n0.square()).sum().sqrt(),
            "dora_lowrank_norm": (c.square() * ba_sq).sum().sqrt() * abs(ad.scaling),
        }
