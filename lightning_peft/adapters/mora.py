"""MoRA: high-rank updating with one square matrix (Jiang et al. 2024, arXiv 2405.12130).

    y = W0 x + b + f_decomp(M f_comp(dropout(x))),   M in R^{R x R}, zero-initialised

`R` (`r_hat`) is chosen so that `R^2 ~ (in + out) * r`, the parameter count of LoRA rank `r`
(reference rounding: round half up; even for the RoPE variant). There is no alpha: the
learning rate alone sets the update size. The fixed, parameter-free operators are
(reference/mora.md §4; `k` = in, `d` = out, `n = ceil(k / R)`):

| variant      | ref. type | f_comp (k -> R)                       | f_decomp (R -> d)           |
| ------------ | --------- | ------------------------------------- | --------------------------- |
| `sharing`    | 1         | wrap-pad to nR, sum the n chunks      | tile                        |
| `type2`      | 2         | contiguous block sums                 | repeat-interleave           |
| `type3`      | 3         | contiguous block sums                 | tile                        |
| `type4`      | 4         | wrap-pad, sum the n chunks            | repeat-interleave           |
| `rope`       | 6         | wrap-pad, split in n chunks, rotate   | concat, truncate or tile    |
|              |           | chunk i by angles i * 10000^(-2q/R)   | with period nR              |
| `decouple`   | (Eq. 8)   | as `rope` without the rotation        | as `rope`                   |
| `truncation` | (Eq. 4)   | first R inputs                        | zero-pad                    |

Wrap padding repeats the input (`x~_p = x_{p mod k}`), so shapes where the reference would
crash (`pad > k`, a single RoPE chunk) are served. `auto` picks `rope` for `r < 128` and
`sharing` otherwise, the paper's recommendation (Table 4, §5.2).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterMethod, check_dropout, check_rank, register_adapter

if TYPE_CHECKING:
    from .base import AdapterLinear

VARIANTS = ("sharing", "type2", "type3", "type4", "rope", "decouple", "truncation")
_TYPE_ALIASES = {1: "sharing", 2: "type2", 3: "type3", 4: "type4", 6: "rope"}
AUTO_ROPE_BELOW_RANK = 128


def resolve_variant(mora_type: str | int, r: int) -> str:
    """Canonical variant name for a `mora_type` given as a name, a reference type number or `auto`."""
    if isinstance(mora_type, int) and not isinstance(mora_type, bool) and mora_type in _TYPE_ALIASES:
        return _TYPE_ALIASES[mora_type]
    if mora_type == "auto":
        return "rope" if r < AUTO_ROPE_BELOW_RANK else "sharing"
    if mora_type in VARIANTS:
        return str(mora_type)
    raise ValueError(
        f"Unknown `mora_type` {mora_type!r}; choose 'auto', one of {list(VARIANTS)} "
        f"or a reference type {sorted(_TYPE_ALIASES)}"
    )


def mora_rank(in_features: int, out_features: int, r: int, variant: str) -> int:
    """Side `R` of M from LoRA rank `r`: round half up, then even for `rope` (reference code)."""
    r_hat = int(math.sqrt((in_features + out_features) * r) + 0.5)
    if variant == "rope":
        r_hat = 2 * (r_hat // 2)
    if r_hat < (2 if variant == "rope" else 1):
        raise ValueError(f"MoRA rank r={r} is too small for a {in_features}->{out_features} layer (r_hat={r_hat})")
    return r_hat


def _wrap_pad(x: Tensor, total: int) -> Tensor:
    """`x~_p = x_{p mod k}` for p < total (repeats x when the padding exceeds k)."""
    k = x.shape[-1]
    if total <= k:
        return x[..., :total]
    if total <= 2 * k:  # the common case: one copy
        return torch.cat([x, x[..., : total - k]], dim=-1)
    reps = -(-total // k)
    return torch.cat([x] * reps, dim=-1)[..., :total]


def _block_sums(x: Tensor, blocks: int) -> Tensor:
    """Sum the last dim in `blocks` consecutive groups, the first `N mod blocks` one larger."""
    n = x.shape[-1]
    q, m = divmod(n, blocks)
    lead = x.shape[:-1]
    big = x[..., : m * (q + 1)].reshape(*lead, m, q + 1).sum(-1)
    small = x[..., m * (q + 1) :].reshape(*lead, blocks - m, q).sum(-1)
    return torch.cat([big, small], dim=-1)


def block_index(n: int, blocks: int, device: torch.device) -> Tensor:
    """`B_N(t)`: the block of each of `n` items under `_block_sums`' grouping."""
    q, m = divmod(n, blocks)
    t = torch.arange(n, device=device)
    head = t // (q + 1)
    tail = m + (t - m * (q + 1)) // max(q, 1)
    return torch.where(t < m * (q + 1), head, tail)


def _interleave(u: Tensor, size: int) -> Tensor:
    """Repeat each of the R entries of `u` over a contiguous block of the `size` outputs."""
    r = u.shape[-1]
    q, m = divmod(size, r)
    lead = u.shape[:-1]
    big = u[..., :m, None].expand(*lead, m, q + 1).reshape(*lead, m * (q + 1))
    small = u[..., m:, None].expand(*lead, r - m, q).reshape(*lead, (r - m) * q)
    return torch.cat([big, small], dim=-1)


def _tile(u: Tensor, size: int) -> Tensor:
    """`h_j = u_{j mod len(u)}` for j < size."""
    return _wrap_pad(u, size)


def _add_tiled(out: Tensor, u: Tensor) -> Tensor:
    """`out + tile(u)` with a broadcast add over whole tiles (the tile is never materialised)."""
    d, r_hat = out.shape[-1], u.shape[-1]
    whole = d // r_hat
    if whole == 0:
        return out + u[..., :d]
    head = (out[..., : whole * r_hat].unflatten(-1, (whole, r_hat)) + u.unsqueeze(-2)).flatten(-2)
    if whole * r_hat == d:
        return head
    return torch.cat([head, out[..., whole * r_hat :] + u[..., : d - whole * r_hat]], dim=-1)


def rotate_half(c: Tensor) -> Tensor:
    """HF-style half-split rotation partner: `[-c[h:], c[:h]]` (pairs q with q + R/2)."""
    h = c.shape[-1] // 2
    return torch.cat([-c[..., h:], c[..., :h]], dim=-1)


@register_adapter
class MoRA(AdapterMethod):
    """MoRA with LoRA-equivalent rank `r`, `dropout` and the operator variant `mora_type`."""

    method = "mora"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        r: int = 8,
        dropout: float = 0.0,
        mora_type: str | int = "auto",
    ) -> None:
        super().__init__(in_features, out_features)
        self.r = check_rank(r)
        self.dropout_p = check_dropout(dropout)
        self.variant = resolve_variant(mora_type, r)
        self.r_hat = mora_rank(in_features, out_features, r, self.variant)
        self.chunks = -(-in_features // self.r_hat)  # n = ceil(k / R)
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.mora_M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat))  # (R, R)
        cos, sin = self._rope_tables() if self.variant == "rope" else (torch.empty(0), torch.empty(0))
        # Buffers (not plain attributes) so they follow .to(); not saved: they are derived.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def count_parameters(cls, in_features: int, out_features: int, **hparams: Any) -> int:
        r = check_rank(hparams.get("r", 8))
        variant = resolve_variant(hparams.get("mora_type", "auto"), r)
        return mora_rank(in_features, out_features, r, variant) ** 2

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.mora_M)

    def _rope_tables(self) -> tuple[Tensor, Tensor]:
        """cos/sin of angle `i * 10000^(-2q/R)` for chunk i, duplicated over the two halves."""
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.r_hat, 2, dtype=torch.float32) / self.r_hat))  # (R/2,)
        angles = torch.arange(self.chunks, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (n, R/2)
        angles = torch.cat([angles, angles], dim=-1)  # (n, R)
        return angles.cos(), angles.sin()

    # -- operators -----------------------------------------------------------------------

    def _chunks(self, x: Tensor) -> Tensor:
        """Wrap-pad to nR and split into `(..., n, R)` chunks (a view when no padding is needed)."""
        x = _wrap_pad(x, self.chunks * self.r_hat)
        return x.reshape(*x.shape[:-1], self.chunks, self.r_hat)

    def _strided_sum(self, x: Tensor) -> Tensor:
        """`z_i = sum_c x~_{cR+i}`: a view-and-sum over the whole chunks plus one wrapped chunk."""
        k, r_hat = self.in_features, self.r_hat
        whole = k // r_hat
        rem = k - whole * r_hat
        if whole == 0 or r_hat - rem > k:  # padding longer than the input: generic wrap
            return self._chunks(x).sum(-2)
        z = x[..., : whole * r_hat].unflatten(-1, (whole, r_hat)).sum(-2)  # a view of x, no copy
        if rem:
            z = z + torch.cat([x[..., whole * r_hat :], x[..., : r_hat - rem]], dim=-1)
        return z

    def _rope_blocks(self, m: Tensor) -> Tensor:
        """`P_i = M Rot_i` for every chunk, `(n, R, R)`: the rotation folded into M once per call.

        Column q of `M Rot_i` is `M[:, q] cos + M[:, q+h] sin`, column q+h is
        `M[:, q+h] cos - M[:, q] sin` (half-split pairing, reference/mora.md §4.3).
        """
        h = self.r_hat // 2
        m_rot = torch.cat([m[:, h:], -m[:, :h]], dim=1)
        cos, sin = self.rope_cos.to(m.dtype)[:, None, :], self.rope_sin.to(m.dtype)[:, None, :]
        return m * cos + m_rot * sin

    def _rope_delta(self, x: Tensor, m: Tensor) -> Tensor:
        """Per-chunk products `y_i = P_i c_i` as one batched matmul; returns `(..., nR)`."""
        blocks = self._rope_blocks(m) if self.variant == "rope" else m.expand(self.chunks, -1, -1)
        c = self._chunks(x)  # (..., n, R)
        lead = c.shape[:-2]
        c = c.reshape(-1, self.chunks, self.r_hat).transpose(0, 1)  # (n, T, R)
        y = torch.bmm(c, blocks.transpose(1, 2))  # (n, T, R)
        return y.transpose(0, 1).reshape(*lead, self.chunks * self.r_hat)

    def mora_delta(self, x: Tensor) -> Tensor:
        """`f_decomp(M f_comp(x))` for an already dropped-out `x`."""
        m = self.mora_M.to(x.dtype)
        d, k, r_hat, v = self.out_features, self.in_features, self.r_hat, self.variant
        if v in ("rope", "decouple"):
            y = self._rope_delta(x, m)
            return y[..., :d] if d <= y.shape[-1] else _tile(y, d)
        if v == "truncation":
            z = x[..., :r_hat] if k >= r_hat else F.pad(x, (0, r_hat - k))
            u = F.linear(z, m)
            return u[..., :d] if d <= r_hat else F.pad(u, (0, d - r_hat))
        u = self._compressed_product(x, m)  # (..., R)
        return _tile(u, d) if v in ("sharing", "type3") else _interleave(u, d)

    def _compressed_product(self, x: Tensor, m: Tensor) -> Tensor:
        """`M f_comp(x)` for the grouping variants (types 1-4), `(..., R)`."""
        z = self._strided_sum(x) if self.variant in ("sharing", "type4") else _block_sums(x, self.r_hat)
        return F.linear(z, m)

    def forward(self, x: Tensor, base_out: Tensor, layer: AdapterLinear) -> Tensor:
        x = self.dropout(x)
        if self.variant in ("sharing", "type3"):  # add the tiled output without materialising the tile
            u = self._compressed_product(x, self.mora_M.to(x.dtype))
            return _add_tiled(base_out, u.to(base_out.dtype))
        return base_out + self.mora_delta(x).to(base_out.dtype)

    def delta_weight(self, weight: Tensor) -> Tensor:
        """Dense `(out, in)` update built by index maps (no loop over columns)."""
        m = self.mora_M.to(weight.dtype)
        d, k, r_hat, n, v = self.out_features, self.in_features, self.r_hat, self.chunks, self.variant
        dev = m.device
        if v == "truncation":
            dw = torch.zeros(d, k, dtype=m.dtype, device=dev)
            rows, cols = min(r_hat, d), min(r_hat, k)
            dw[:rows, :cols] = m[:rows, :cols]
            return dw
        padded = torch.arange(n * r_hat, device=dev)  # positions p of the padded input
        if v in ("rope", "decouple"):
            blocks = m.expand(n, r_hat, r_hat)
            if v == "rope":  # P_i = M Rot_i; rotating the identity's rows gives Rot_i^T
                eye = torch.eye(r_hat, dtype=m.dtype, device=dev).expand(n, r_hat, r_hat)
                cos, sin = self.rope_cos.to(m.dtype)[:, None, :], self.rope_sin.to(m.dtype)[:, None, :]
                blocks = m @ (eye * cos + rotate_half(eye) * sin).transpose(-1, -2)
            full = torch.zeros(n, r_hat, n, r_hat, dtype=m.dtype, device=dev)
            idx = torch.arange(n, device=dev)
            full[idx, :, idx, :] = blocks
            full = full.reshape(n * r_hat, n * r_hat)  # block diagonal over padded inputs
            folded = torch.zeros(n * r_hat, k, dtype=m.dtype, device=dev).index_add_(1, padded % k, full)
            return folded[torch.arange(d, device=dev) % (n * r_hat)]
        rows = torch.arange(d, device=dev) % r_hat if v in ("sharing", "type3") else block_index(d, r_hat, dev)
        m_rows = m[rows]  # (d, R)
        if v in ("type2", "type3"):
            return m_rows[:, block_index(k, r_hat, dev)]
        # strided compression: padded position p reads x_{p mod k} and feeds z_{p mod R}
        return torch.zeros(d, k, dtype=m.dtype, device=dev).index_add_(1, padded % k, m_rows[:, padded % r_hat])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, r_hat={self.r_hat}, variant={self.variant}"
