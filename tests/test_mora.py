"""MoRA: r_hat rule, parameter budget, rank, and the dense delta against independent references.

The references below are written from the MoRA paper (arXiv 2405.12130) and the authors' code
(github.com/kongds/MoRA): its block map `B_N`, the per-element table of types 1-4, and the merged
form of the RoPE variant (docs/methods.md), with plain Python loops in float64; they share no code with
`lightning_peft.adapters.mora`, so a mistake common to its forward and `delta_weight` shows up.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_peft.adapters import MoRA, mora_rank
from lightning_peft.adapters.mora import VARIANTS, resolve_variant

F64 = torch.float64

# r_hat of the authors' code: (k, d), r, code (round half up), code type 6 (then even)
R_HAT_TABLE = [
    ((4096, 4096), 8, 256, 256),
    ((4096, 4096), 128, 1024, 1024),
    ((4096, 4096), 256, 1448, 1448),
    ((4096, 11008), 8, 348, 348),
    ((11008, 4096), 8, 348, 348),
    ((4096, 11008), 256, 1966, 1966),
    ((11008, 4096), 256, 1966, 1966),
    ((4096, 1024), 8, 202, 202),
    ((4096, 1024), 256, 1145, 1144),
    ((768, 768), 128, 443, 442),
    ((768, 2560), 128, 653, 652),
    ((2560, 768), 128, 653, 652),
]


def make_mora(k: int, d: int, r: int, variant: str, seed: int = 0) -> MoRA:
    mod = MoRA(k, d, r=r, mora_type=variant).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mod.mora_M.copy_(torch.randn(mod.r_hat, mod.r_hat, generator=g, dtype=F64))
    return mod


def our_delta(mod: MoRA) -> torch.Tensor:
    return mod.delta_weight(torch.zeros(mod.out_features, mod.in_features, dtype=F64))


# -- independent references -------------------------------------------------------------


def ref_block(n_items: int, blocks: int, t: int) -> int:
    """`B_N(t)`: the block of item t when n_items are split into `blocks` near-equal contiguous blocks."""
    q, m = divmod(n_items, blocks)
    if t < m * (q + 1):
        return t // (q + 1)
    return m + (t - m * (q + 1)) // q


def ref_delta_table(m: torch.Tensor, k: int, d: int, variant: str) -> torch.Tensor:
    """Per-element ΔW[j, l] of the types 1-4 table, valid when pad <= k."""
    big_r = m.shape[0]
    n = math.ceil(k / big_r)
    pad = n * big_r - k
    assert pad <= k
    tile_rows = variant in ("sharing", "type3")
    strided_cols = variant in ("sharing", "type4")
    m = m.tolist()
    out = torch.zeros(d, k, dtype=F64)
    for j in range(d):
        row = j % big_r if tile_rows else ref_block(d, big_r, j)
        for col in range(k):
            if strided_cols:
                val = m[row][col % big_r]
                if col < pad:
                    val += m[row][big_r - pad + col]
            else:
                val = m[row][ref_block(k, big_r, col)]
            out[j, col] = val
    return out


def ref_delta_operators(m: torch.Tensor, k: int, d: int, variant: str) -> torch.Tensor:
    """ΔW = D M C with the 0/1 matrices built from the operator definitions.

    Compression: strided sum over the wrap-padded input `x~_p = x_{p mod k}` (any pad, even pad > k),
    or contiguous block sums. Decompression: tile `h_j = u_{j mod R}` or interleave `h_j = u_{B_d(j)}`.
    """
    big_r = m.shape[0]
    n = math.ceil(k / big_r)
    comp = torch.zeros(big_r, k, dtype=F64)
    if variant in ("sharing", "type4"):
        for p in range(n * big_r):
            comp[p % big_r, p % k] += 1.0
    else:
        for col in range(k):
            comp[ref_block(k, big_r, col), col] += 1.0
    decomp = torch.zeros(d, big_r, dtype=F64)
    for j in range(d):
        decomp[j, j % big_r if variant in ("sharing", "type3") else ref_block(d, big_r, j)] = 1.0
    return decomp @ m @ comp


def ref_delta_rope(m: torch.Tensor, k: int, d: int, rotate: bool) -> torch.Tensor:
    """The RoPE variant's merged form: P_i = M Rot_i, block-diagonal, wrapped columns folded, rows mod nR."""
    big_r = m.shape[0]
    h = big_r // 2
    n = math.ceil(k / big_r)
    m = m.tolist()
    w_tilde = [[0.0] * k for _ in range(n * big_r)]
    for i in range(n):
        p = [row[:] for row in m]  # P_i = M for decouple
        if rotate:
            for q in range(h):
                phi = i * 10000.0 ** (-2.0 * q / big_r)
                c, s = math.cos(phi), math.sin(phi)
                for row in range(big_r):
                    p[row][q] = m[row][q] * c + m[row][q + h] * s
                    p[row][q + h] = m[row][q + h] * c - m[row][q] * s
        for s_ in range(big_r):
            for t in range(big_r):
                w_tilde[i * big_r + s_][(i * big_r + t) % k] += p[s_][t]
    return torch.tensor([w_tilde[j % (n * big_r)] for j in range(d)], dtype=F64)


def ref_delta_truncation(m: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """Paper Eq. 4/5: ΔW = [[M, 0], [0, 0]] cut to (d, k)."""
    big_r = m.shape[0]
    out = torch.zeros(d, k, dtype=F64)
    for j in range(min(d, big_r)):
        for col in range(min(k, big_r)):
            out[j, col] = m[j, col]
    return out


# Small shapes for the loop references: (k, d, r). The comments give R for 'sharing'.
REF_SHAPES = [
    (12, 12, 1),  # square, R=5, n=3, pad=3
    (10, 7, 2),  # R=6, pad=2
    (8, 20, 2),  # wide, R=7, pad=6; rope R=6, nR=12 < d: tiled
    (20, 6, 1),  # tall, R=5 divides k
    (24, 6, 1),  # GQA-like 4:1, R=6
    (100, 37, 4),  # non-divisible, R=23, pad=15
    (60, 300, 4),  # R=38, pad=16
    (4, 40, 2),  # R=9 > k, pad=5 > k
    (16, 200, 8),  # R=42, pad=26 > k
    (20, 40, 8),  # rope R=22: one chunk, pad=2
]


@pytest.mark.parametrize(("k", "d", "r"), REF_SHAPES)
@pytest.mark.parametrize("variant", ["sharing", "type2", "type3", "type4"])
def test_delta_matches_operator_reference(k, d, r, variant):
    mod = make_mora(k, d, r, variant)
    expected = ref_delta_operators(mod.mora_M.detach(), k, d, variant)
    torch.testing.assert_close(our_delta(mod), expected, rtol=1e-12, atol=1e-12)


def _pad(k: int, d: int, r: int) -> int:
    big_r = mora_rank(k, d, r, "sharing")
    return math.ceil(k / big_r) * big_r - k


# The table formula holds for pad <= k only; pad > k is covered by the operator reference.
TABLE_SHAPES = [s for s in REF_SHAPES if _pad(*s) <= s[0]]


def test_table_shapes_leave_out_only_pad_exceeding_k():
    assert sorted(set(REF_SHAPES) - set(TABLE_SHAPES)) == [(4, 40, 2), (16, 200, 8)]


@pytest.mark.parametrize(("k", "d", "r"), TABLE_SHAPES)
@pytest.mark.parametrize("variant", ["sharing", "type2", "type3", "type4"])
def test_delta_matches_table_formula(k, d, r, variant):
    mod = make_mora(k, d, r, variant)
    expected = ref_delta_table(mod.mora_M.detach(), k, d, variant)
    torch.testing.assert_close(our_delta(mod), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("k", "d", "r"), REF_SHAPES)
@pytest.mark.parametrize("variant", ["rope", "decouple"])
def test_delta_matches_merged_form_reference(k, d, r, variant):
    mod = make_mora(k, d, r, variant)
    expected = ref_delta_rope(mod.mora_M.detach(), k, d, rotate=variant == "rope")
    # rope cos/sin tables are built in fp32 (as the reference implementation does)
    tol = 1e-5 if variant == "rope" else 1e-12
    torch.testing.assert_close(our_delta(mod), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(("k", "d", "r"), REF_SHAPES)
def test_delta_matches_truncation_reference(k, d, r):
    mod = make_mora(k, d, r, "truncation")
    expected = ref_delta_truncation(mod.mora_M.detach(), k, d)
    torch.testing.assert_close(our_delta(mod), expected, rtol=0, atol=0)


def test_rope_reference_rotates_chunks():
    """Guard the reference itself: chunk 0 is unrotated, chunk 1 differs from M (so rotation is exercised)."""
    mod = make_mora(12, 12, 1, "rope")  # R=4, n=3, no padding
    ref = ref_delta_rope(mod.mora_M.detach(), 12, 12, rotate=True)
    m = mod.mora_M.detach()
    torch.testing.assert_close(ref[:4, :4], m, rtol=0, atol=0)
    assert not torch.allclose(ref[4:8, 4:8], m)
    assert ref[:4, 4:].abs().max() == 0


# -- forward == delta_weight @ x ---------------------------------------------------------

FORWARD_SHAPES = [
    pytest.param(64, 64, 2, id="square"),
    pytest.param(32, 96, 2, id="wide"),
    pytest.param(96, 32, 2, id="tall"),
    pytest.param(256, 64, 4, id="gqa"),
    pytest.param(100, 37, 4, id="nondiv-100-37"),
    pytest.param(60, 300, 4, id="nondiv-60-300"),
    pytest.param(16, 200, 8, id="pad-exceeds-k"),
    pytest.param(20, 40, 8, id="single-chunk"),
    pytest.param(512, 512, 8, id="attn-scaled"),
    pytest.param(512, 1376, 8, id="mlp-up-scaled"),
    pytest.param(1376, 512, 8, id="mlp-down-scaled"),
    pytest.param(512, 128, 64, id="gqa-large-r"),
]


@pytest.mark.parametrize(("k", "d", "r"), FORWARD_SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_delta_weight_matches_forward(k, d, r, variant):
    mod = make_mora(k, d, r, variant)
    x = torch.randn(3, 5, k, dtype=F64)
    y = mod.mora_delta(x)
    assert y.shape == (3, 5, d)
    torch.testing.assert_close(y, x @ our_delta(mod).T, rtol=1e-10, atol=1e-10)


def test_single_chunk_rope_case_is_single_chunk():
    mod = MoRA(20, 40, r=8, mora_type="rope")
    assert (mod.r_hat, mod.chunks) == (22, 1)


def test_pad_exceeds_in_features_case():
    mod = MoRA(16, 200, r=8, mora_type="sharing")
    assert mod.r_hat == 42 and mod.chunks * mod.r_hat - 16 > 16


# -- r_hat, parameter budget, rank ------------------------------------------------------


@pytest.mark.parametrize(("shape", "r", "code", "code6"), R_HAT_TABLE)
def test_r_hat_table(shape, r, code, code6):
    k, d = shape
    assert mora_rank(k, d, r, "sharing") == code
    assert mora_rank(k, d, r, "rope") == code6


@pytest.mark.parametrize(("shape", "r", "code", "code6"), R_HAT_TABLE)
@pytest.mark.parametrize("variant", ["sharing", "rope"])
def test_parameter_count_close_to_lora(shape, r, code, code6, variant):
    k, d = shape
    lora = r * (k + d)
    expected = (code6 if variant == "rope" else code) ** 2
    assert MoRA.count_parameters(k, d, r=r, mora_type=variant) == expected
    assert abs(expected - lora) / lora < 0.01
    if k * d <= 4096 * 4096:  # building is cheap (M is R x R); keep the biggest out
        mod = MoRA(k, d, r=r, mora_type=variant)
        assert mod.num_trainable_parameters() == expected


@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("variant", ["sharing", "type2", "type3", "type4"])
def test_rank_bounded_by_r_hat(variant, r):
    mod = make_mora(64, 64, r, variant)
    rank = int(torch.linalg.matrix_rank(our_delta(mod)))
    assert rank <= mod.r_hat
    assert rank == mod.r_hat  # random M: the bound is attained (R <= 64)


@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("variant", ["rope", "decouple"])
def test_rank_exceeds_r_hat(variant, r):
    mod = make_mora(64, 64, r, variant)
    rank = int(torch.linalg.matrix_rank(our_delta(mod)))
    assert rank > mod.r_hat
    assert rank >= 64 - mod.r_hat  # block structure: nearly full rank


def test_rope_tables_angles():
    mod = MoRA(64, 64, r=2, mora_type="rope")  # R=16, n=4
    big_r, n = mod.r_hat, mod.chunks
    for i in range(n):
        for q in range(big_r // 2):
            phi = i * 10000.0 ** (-2.0 * q / big_r)
            for col in (q, q + big_r // 2):
                assert mod.rope_cos[i, col].item() == pytest.approx(math.cos(phi), abs=1e-6)
                assert mod.rope_sin[i, col].item() == pytest.approx(math.sin(phi), abs=1e-6)


# -- variant selection -------------------------------------------------------------------


@pytest.mark.parametrize(("r", "expected"), [(1, "rope"), (8, "rope"), (64, "rope"), (127, "rope"), (128, "sharing")])
def test_auto_variant(r, expected):
    assert resolve_variant("auto", r) == expected


def test_auto_variant_large_rank():
    assert resolve_variant("auto", 256) == "sharing"
    assert MoRA(64, 64, r=256).variant == "sharing"
    assert MoRA(64, 64, r=8).variant == "rope"


@pytest.mark.parametrize(("alias", "name"), [(1, "sharing"), (2, "type2"), (3, "type3"), (4, "type4"), (6, "rope")])
def test_reference_type_numbers(alias, name):
    assert resolve_variant(alias, 8) == name
    assert MoRA(32, 32, r=2, mora_type=alias).variant == name


@pytest.mark.parametrize("bad", [5, 0, "type5", "Sharing", True, None])
def test_unknown_mora_type(bad):
    with pytest.raises(ValueError, match="Unknown `mora_type`"):
        MoRA(32, 32, r=2, mora_type=bad)


def test_rank_too_small_for_rope():
    with pytest.raises(ValueError, match="too small"):
        MoRA(1, 1, r=1, mora_type="rope")


def test_zero_init():
    mod = MoRA(40, 24, r=4, mora_type="rope")
    assert torch.count_nonzero(mod.mora_M) == 0
    assert mod.mora_M.requires_grad
    x = torch.randn(3, 40)
    assert torch.count_nonzero(mod.mora_delta(x)) == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_nonzero_at_zero_init(variant):
    mod = MoRA(40, 24, r=4, mora_type=variant)
    mod.mora_delta(torch.randn(3, 40)).mul(torch.randn(3, 24)).sum().backward()
    assert mod.mora_M.grad.abs().sum() > 0
