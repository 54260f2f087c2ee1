"""MoRA: high-rank updating with one square matrix (Jiang et al. 2024, arXiv 2405.12130).

    y = W0 x + b + f_decomp(M f_comp(dropout(x))),   M in R^{R x R}, zero-initialised

`R` (`r_hat`) is chosen so that `R^2 ~ (in + out) * r`, the parameter count of LoRA rank `r`
(the authors' code's rounding, github.com/kongds/MoRA: round half up; even for RoPE). There is no
alpha: the learning rate alone sets the update size. The fixed, parameter-free operators
(`k` = in, `d` = out, `n = ceil(k / R)`; docs/methods.md):

| variant      | ref. type | f_comp (k -> slots)                   | f_decomp (slots -> d)       |
| ------------ | --------- | ------------------------------------- | --------------------------- |
| `sharing`    | 1         | wrap-pad to nR, sum the n chunks      | tile                        |
| `type2`      | 2         | contiguous block sums                 | repeat-interleave           |
| `type3`      | 3         | contiguous block sums                 | tile                        |
| `type4`      | 4         | wrap-pad, sum the n chunks            | repeat-interleave           |
| `rope`       | 6         | wrap-pad to nR, M acts on each chunk  | tile with period nR         |
|              |           | as `P_i = M Rot_i`, angles            | (concat, truncate or tile)  |
|              |           | `i * 10000^(-2q/R)`                   |                             |
| `decouple`   | (Eq. 8)   | as `rope` without the rotation        | as `rope`                   |
| `truncation` | (Eq. 4)   | first R inputs                        | zero-pad                    |

Each variant is one `Variant` record in `OPERATORS`: a compression and a decompression, each
a fast forward function plus its dense index map. The forward, the dense update and the
exact singular values are all written once against these records.

Wrap padding repeats the input (`x~_p = x_{p mod k}`), so shapes where the reference would
crash (`pad > k`, a single RoPE chunk) are served. `auto` picks `rope` for `r < 128` and
`sharing` otherwise, the paper's recommendation (Table 4, §5.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterMethod, accumulation_dtype, check_dropout, check_rank, register_adapter
from .sharded import whole

if TYPE_CHECKING:
    from .base import AdapterLinear

AUTO_ROPE_BELOW_RANK = 128


# -- the fixed maps ----------------------------------------------------------------------


def _wrap_pad(x: Tensor, total: int) -> Tensor:
    """`x~_p = x_{p mod k}` for p < total (repeats x when the padding exceeds k; truncates if shorter)."""
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


def _strided_sum(x: Tensor, r_hat: int, chunks: int) -> Tensor:
    """`z_i = sum_c x~_{cR+i}`: a view-and-sum over the whole chunks plus one wrapped chunk."""
    k = x.shape[-1]
    whole = k // r_hat
    rem = k - whole * r_hat
    if whole == 0 or r_hat - rem > k:  # padding longer than the input: generic wrap
        x = _wrap_pad(x, chunks * r_hat)
        return x.reshape(*x.shape[:-1], chunks, r_hat).sum(-2)
    z = x[..., : whole * r_hat].unflatten(-1, (whole, r_hat)).sum(-2)  # a view of x, no copy
    if rem:
        z = z + torch.cat([x[..., whole * r_hat :], x[..., : r_hat - rem]], dim=-1)
    return z


def _interleave(u: Tensor, size: int) -> Tensor:
    """Repeat each of the S entries of `u` over a contiguous block of the `size` outputs."""
    r = u.shape[-1]
    q, m = divmod(size, r)
    lead = u.shape[:-1]
    big = u[..., :m, None].expand(*lead, m, q + 1).reshape(*lead, m * (q + 1))
    small = u[..., m:, None].expand(*lead, r - m, q).reshape(*lead, (r - m) * q)
    return torch.cat([big, small], dim=-1)


def _add_tiled(out: Tensor, u: Tensor) -> Tensor:
    """`out + tile(u)` with a broadcast add over whole tiles (the tile is never materialised)."""
    d, period = out.shape[-1], u.shape[-1]
    whole = d // period
    if whole == 0:
        return out + u[..., :d]
    head = (out[..., : whole * period].unflatten(-1, (whole, period)) + u.unsqueeze(-2)).flatten(-2)
    if whole * period == d:
        return head
    return torch.cat([head, out[..., whole * period :] + u[..., : d - whole * period]], dim=-1)


def _zero_pad(u: Tensor, size: int) -> Tensor:
    return u[..., :size] if size <= u.shape[-1] else F.pad(u, (0, size - u.shape[-1]))


# -- operator records --------------------------------------------------------------------


@dataclass(frozen=True)
class Compression:
    """`f_comp`: `k` inputs -> `S` slots, a fixed 0/1 map `C (S x k)`.

    `apply(x, R, n)` is the fast forward; `pairs(k, R, n, device)` lists every 1 of `C` as
    `(input columns, slots)`.
    """

    apply: Callable[[Tensor, int, int], Tensor]
    pairs: Callable[[int, int, int, torch.device], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Decompression:
    """`f_decomp`: `S` slots -> `d` outputs, a fixed map `D (d x S)` with at most one 1 per row.

    `add(out, u)` is the fast forward `out + f_decomp(u)`; `index(d, S, device)` is the slot
    each output copies (-1: the output stays zero).
    """

    add: Callable[[Tensor, Tensor], Tensor]
    index: Callable[[int, int, torch.device], Tensor]


@dataclass(frozen=True)
class Variant:
    """One MoRA variant: `dW = D core C`, with `core = M` (S = R), or for `chunked` variants
    `core = blockdiag(P_0 .. P_{n-1})` (S = nR), `P_i = M Rot_i` (`rotate`) or `M`."""

    compress: Compression
    decompress: Decompression
    chunked: bool = False
    rotate: bool = False
    ref_type: int | None = None


def _strided_pairs(k: int, r_hat: int, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    p = torch.arange(n * r_hat, device=device)  # padded position p reads x_{p mod k}, feeds z_{p mod R}
    return p % k, p % r_hat


def _chunk_pairs(k: int, r_hat: int, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    p = torch.arange(n * r_hat, device=device)  # padded position p reads x_{p mod k}, is slot p
    return p % k, p


STRIDED = Compression(_strided_sum, _strided_pairs)
BLOCKS = Compression(
    lambda x, r_hat, n: _block_sums(x, r_hat),
    lambda k, r_hat, n, dev: (torch.arange(k, device=dev), block_index(k, r_hat, dev)),
)
CHUNKS = Compression(lambda x, r_hat, n: _wrap_pad(x, n * r_hat), _chunk_pairs)
FIRST = Compression(
    lambda x, r_hat, n: _zero_pad(x, r_hat),
    lambda k, r_hat, n, dev: (torch.arange(min(k, r_hat), device=dev),) * 2,
)
TILE = Decompression(_add_tiled, lambda d, s, dev: torch.arange(d, device=dev) % s)
INTERLEAVE = Decompression(lambda out, u: out + _interleave(u, out.shape[-1]), block_index)
ZERO_PAD = Decompression(
    lambda out, u: out + _zero_pad(u, out.shape[-1]),
    lambda d, s, dev: torch.where(torch.arange(d, device=dev) < s, torch.arange(d, device=dev), -1),
)

OPERATORS: dict[str, Variant] = {
    "sharing": Variant(STRIDED, TILE, ref_type=1),
    "type2": Variant(BLOCKS, INTERLEAVE, ref_type=2),
    "type3": Variant(BLOCKS, TILE, ref_type=3),
    "type4": Variant(STRIDED, INTERLEAVE, ref_type=4),
    "rope": Variant(CHUNKS, TILE, chunked=True, rotate=True, ref_type=6),
    "decouple": Variant(CHUNKS, TILE, chunked=True),
    "truncation": Variant(FIRST, ZERO_PAD),
}
VARIANTS = tuple(OPERATORS)

# ReMoRA (paper App. B): after each merge the next sharing type, so successive updates
# `J (x) M1 + M2 (x) J` add up past rank R. The reference cycles types 1->2->3->4 by default and
# alternates 1<->2 otherwise; it has no rule for RoPE (type 6), which alternates here with
# `decouple` (the same chunks without the rotation). The other variants (`decouple` built as
# such included: its R may be odd) keep their operator.
RESTART_CYCLES: dict[int, tuple[tuple[str, ...], ...]] = {
    4: (("sharing", "type2", "type3", "type4"), ("rope", "decouple")),
    2: (("sharing", "type2"), ("rope", "decouple")),
}
_TYPE_ALIASES = {v.ref_type: name for name, v in OPERATORS.items() if v.ref_type is not None}


def resolve_variant(mora_type: str | int, r: int) -> str:
    """Canonical variant name for a `mora_type` given as a name, a reference type number or `auto`."""
    if isinstance(mora_type, int) and not isinstance(mora_type, bool) and mora_type in _TYPE_ALIASES:
        return _TYPE_ALIASES[mora_type]
    if mora_type == "auto":
        return "rope" if r < AUTO_ROPE_BELOW_RANK else "sharing"
    if mora_type in OPERATORS:
        return str(mora_type)
    raise ValueError(
        f"Unknown `mora_type` {mora_type!r}; choose 'auto', one of {list(VARIANTS)} "
        f"or a reference type {sorted(_TYPE_ALIASES)}"
    )


def mora_rank(in_features: int, out_features: int, r: int, variant: str) -> int:
    """Side `R` of M from LoRA rank `r`: round half up, then even when rotating (authors' code)."""
    rotate = OPERATORS[variant].rotate
    r_hat = int(math.sqrt((in_features + out_features) * r) + 0.5)
    if rotate:
        r_hat = 2 * (r_hat // 2)
    if r_hat < (2 if rotate else 1):
        raise ValueError(f"MoRA rank r={r} is too small for a {in_features}->{out_features} layer (r_hat={r_hat})")
    return r_hat


def restart_cycle(variant: str, remora_types: int) -> tuple[str, ...]:
    """The operators ReMoRA visits from `variant`, starting with it."""
    if isinstance(remora_types, bool) or remora_types not in RESTART_CYCLES:
        raise ValueError(f"`remora_types` must be one of {sorted(RESTART_CYCLES)}, got {remora_types!r}")
    for cycle in RESTART_CYCLES[remora_types]:
        if variant in cycle and (variant != "decouple"):  # an odd R has no rotation: decouple keeps its operator
            i = cycle.index(variant)
            return cycle[i:] + cycle[:i]
    if variant in ("type3", "type4"):
        raise ValueError(f"`remora_types=2` alternates sharing and type2; {variant!r} is not in that cycle")
    return (variant,)


def _psd_sqrt(g: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(g)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.t()


@register_adapter
class MoRA(AdapterMethod):
    """MoRA with LoRA-equivalent rank `r`, `dropout` and the operator variant `mora_type`.

    `remora_types` only matters under merge-and-restart (ReMoRA): the sharing types cycled
    through, 4 (`sharing -> type2 -> type3 -> type4`, the reference code's default) or 2
    (`sharing <-> type2`, the paper's App. B). `RESTART_CYCLES` has the whole rule.
    """

    method = "mora"
    label = "MoRA"  # no peft tuner: export folds it or converts it by SVD
    suggest_roles = frozenset({"high_rank"})
    default_lr_scale = 1.5  # no alpha: its step size is the learning rate alone

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        r: int = 8,
        dropout: float = 0.0,
        mora_type: str | int = "auto",
        remora_types: int = 4,
    ) -> None:
        super().__init__(in_features, out_features)
        self.r = check_rank(r)
        self.dropout_p = check_dropout(dropout)
        self.variant = resolve_variant(mora_type, r)
        self.restart_cycle = restart_cycle(self.variant, remora_types)
        self.remora_types = remora_types
        self.ops = OPERATORS[self.variant]
        self.r_hat = mora_rank(in_features, out_features, r, self.variant)
        self.chunks = -(-in_features // self.r_hat)  # n = ceil(k / R)
        self.slots = self.chunks * self.r_hat if self.ops.chunked else self.r_hat  # S
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.mora_M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat))  # (R, R)
        cos, sin = self._rope_tables() if self.ops.rotate else (torch.empty(0), torch.empty(0))
        # Buffers (not plain attributes) so they follow .to(); not saved: they are derived.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._grams: tuple[Tensor, Tensor] | None = None  # fixed per shape: computed once for diagnostics

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.mora_M)

    # -- ReMoRA: merge, zero M, next sharing type ----------------------------------------

    @torch.no_grad()
    def restart(self, layer: AdapterLinear, cycle: int, generator: torch.Generator) -> None:
        """M zero (the update restarts at zero) and the operator of cycle `cycle` (`RESTART_CYCLES`)."""
        self.reset_parameters()
        self.set_cycle(cycle)

    def set_cycle(self, cycle: int) -> None:
        """Switch to the operator of cycle `cycle`; `R`, `n` and the slots are the same along a cycle."""
        self.variant = self.restart_cycle[cycle % len(self.restart_cycle)]
        self.ops = OPERATORS[self.variant]
        self._grams = None

    def _rope_tables(self) -> tuple[Tensor, Tensor]:
        """cos/sin of angle `i * 10000^(-2q/R)` for chunk i, duplicated over the two halves."""
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.r_hat, 2, dtype=torch.float32) / self.r_hat))  # (R/2,)
        angles = torch.arange(self.chunks, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (n, R/2)
        angles = torch.cat([angles, angles], dim=-1)  # (n, R)
        return angles.cos(), angles.sin()

    # -- the core: M, or one block per chunk ---------------------------------------------

    def chunk_blocks(self, m: Tensor) -> Tensor:
        """`P_i = M Rot_i` for every chunk, `(n, R, R)` (a view of M when not rotated).

        Column q of `M Rot_i` is `M[:, q] cos + M[:, q+h] sin`, column q+h is
        `M[:, q+h] cos - M[:, q] sin` (half-split pairing, as the authors' code).
        """
        if not self.ops.rotate:
            return m.expand(self.chunks, -1, -1)
        h = self.r_hat // 2
        m_rot = torch.cat([m[:, h:], -m[:, :h]], dim=1)
        cos, sin = self.rope_cos.to(m.dtype)[:, None, :], self.rope_sin.to(m.dtype)[:, None, :]
        return m * cos + m_rot * sin

    def _core(self, z: Tensor, m: Tensor) -> Tensor:
        """`core z` for compressed inputs `z (..., S)`: `M z`, or `P_i z_i` per chunk as one batched matmul."""
        if not self.ops.chunked:
            return F.linear(z, m)
        lead = z.shape[:-1]
        c = z.reshape(-1, self.chunks, self.r_hat).transpose(0, 1)  # (n, T, R)
        y = torch.bmm(c, self.chunk_blocks(m).transpose(1, 2))  # (n, T, R)
        return y.transpose(0, 1).reshape(*lead, self.slots)

    def _dense_core(self, m: Tensor) -> Tensor:
        """The core as an `(S, S)` matrix."""
        return torch.block_diag(*self.chunk_blocks(m)) if self.ops.chunked else m

    # -- forward and the dense update ----------------------------------------------------

    def _compressed_product(self, x: Tensor) -> Tensor:
        """`core f_comp(x)`, `(..., S)`."""
        z = self.ops.compress.apply(x, self.r_hat, self.chunks)
        return self._core(z, self.mora_M.to(x.dtype))

    def mora_delta(self, x: Tensor) -> Tensor:
        """`f_decomp(core f_comp(x))` for an already dropped-out `x`."""
        u = self._compressed_product(x)
        return self.ops.decompress.add(u.new_zeros(*u.shape[:-1], self.out_features), u)

    def forward(self, x: Tensor, base_out: Tensor, layer: AdapterLinear) -> Tensor:
        u = self._compressed_product(self.dropout(x))
        return self.ops.decompress.add(base_out, u.to(base_out.dtype))

    def delta_weight(self, weight: Tensor) -> Tensor:
        """Dense `(out, in)` update `D core C`, built by index maps (no loop over columns)."""
        return self.dense_rows(self.mora_M.to(weight.dtype), slice(None))

    def merge_rows(self, weight_rows: Tensor, rows: slice) -> Tensor:
        """This rank's rows of `W0 + D core C`, from the whole (`R x R`) M."""
        return weight_rows + self.dense_rows(whole(self.mora_M).to(weight_rows.dtype), rows)

    def dense_rows(self, m: Tensor, rows: slice) -> Tensor:
        """Rows `rows` of the dense update for the core matrix `m`: output row i copies core row `D(i)`."""
        core = self._dense_core(m)  # (S, S)
        dev = core.device
        index = self.ops.decompress.index(self.out_features, self.slots, dev)[rows]  # (rows,)
        cols, slots = self.ops.compress.pairs(self.in_features, self.r_hat, self.chunks, dev)
        core_rows = torch.where((index >= 0)[:, None], core[index.clamp_min(0)], torch.zeros_like(core[:1]))
        dw = torch.zeros(len(index), self.in_features, dtype=core.dtype, device=dev)
        return dw.index_add_(1, cols, core_rows[:, slots])

    # -- exact singular values from R x R problems ---------------------------------------

    def _row_counts(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """How many outputs copy each slot: `diag(D^T D)`, `(S,)`."""
        rows = self.ops.decompress.index(self.out_features, self.slots, device)
        return torch.bincount(rows[rows >= 0], minlength=self.slots).to(dtype)

    def _gram_roots(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """`(sqrt(diag(D^T D)), (C C^T)^1/2)` for the un-chunked variants; fixed per layer, cached."""
        if self._grams is None or self._grams[0].device != device or self._grams[0].dtype != dtype:
            cols, slots = self.ops.compress.pairs(self.in_features, self.r_hat, self.chunks, device)
            c = torch.zeros(self.r_hat, self.in_features, dtype=dtype, device=device)
            c.index_put_((slots, cols), torch.ones_like(cols, dtype=dtype), accumulate=True)
            self._grams = (self._row_counts(device, dtype).sqrt(), _psd_sqrt(c @ c.t()))
        return self._grams

    @torch.no_grad()
    def update_singular_values(self, weight: Tensor) -> Tensor:
        """Exact `sigma(D core C)` without the `out x in` update.

        Un-chunked: `sigma(G_D^1/2 M G_C^1/2)` with the `R x R` Grams `G_D = D^T D` (diagonal)
        and `G_C = C C^T` (the non-zero eigenvalues of `C^T X C` equal those of
        `G_C^1/2 X G_C^1/2`). Chunked: see `_chunked_singular_values`.
        """
        m = self.mora_M.detach().to(accumulation_dtype(self.mora_M.device))
        if self.ops.chunked:
            return self._chunked_singular_values(m)
        row_w, col_root = self._gram_roots(m.device, m.dtype)
        return torch.linalg.svdvals(row_w[:, None] * m @ col_root)

    def _chunked_singular_values(self, m: Tensor) -> Tensor:
        """`dW` repeats rows of `fold(blockdiag(P_i))`: `sigma(diag(sqrt(cnt)) fold(...))`.

        Blocks the wrap padding does not fold are independent and `Rot_i` is orthogonal, so
        each gives `sigma(diag(sqrt(cnt_i)) M)`; identical `cnt_i` are solved once. With
        padding, blocks 0 and `n-1` share columns and form one `2R x (2R - pad)` problem.
        """
        k, r_hat, n = self.in_features, self.r_hat, self.chunks
        pad = n * r_hat - k
        weights = self._row_counts(m.device, m.dtype).sqrt().reshape(n, r_hat)
        blocks = self.chunk_blocks(m)
        if pad and n == 1:  # one block folded onto itself: R x k, small
            folded = torch.zeros(r_hat, k, dtype=m.dtype, device=m.device)
            folded.index_add_(1, torch.arange(r_hat, device=m.device) % k, blocks[0])
            return torch.linalg.svdvals(weights[0, :, None] * folded)
        parts = []
        independent = list(range(n) if not pad else range(1, n - 1))
        if independent:
            unique, counts = torch.unique(weights[independent], dim=0, return_counts=True)
            sv = torch.linalg.svdvals(unique[:, :, None] * m)  # sigma(diag(w) M Rot) = sigma(diag(w) M)
            parts.append(sv.repeat_interleave(counts, dim=0).flatten())
        if pad:  # blocks 0 and n-1 share the first `pad` columns
            first, last = blocks[0], blocks[n - 1]
            joint = torch.zeros(2 * r_hat, 2 * r_hat - pad, dtype=m.dtype, device=m.device)
            joint[:r_hat, :r_hat] = first
            joint[r_hat:, r_hat:] = last[:, : r_hat - pad]
            joint[r_hat:, :pad] += last[:, r_hat - pad :]
            w = torch.cat([weights[0], weights[n - 1]])
            parts.append(torch.linalg.svdvals(w[:, None] * joint))
        return torch.cat(parts)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, r_hat={self.r_hat}, variant={self.variant}"
