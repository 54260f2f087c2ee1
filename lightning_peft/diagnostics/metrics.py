"""Pure metrics of a weight update `dW = W_eff - W0` (docs/methods.md; drift: DoRA, arXiv 2402.09353).

Every spectral metric is a function of the singular values `s` of `dW` (any order, zeros
allowed, as returned by `torch.linalg.svdvals` or by the cheap routes in `spectra.py`):

| metric           | formula                                              | zero update |
| ---------------- | ---------------------------------------------------- | ----------- |
| `fro_norm`       | `||dW||_F = sqrt(sum s^2)`                           | 0           |
| `rel_norm`       | `||dW||_F / ||W0||_F`                                | 0           |
| `spectral_ratio` | `s_1 / sigma_1(W0)`                                  | 0           |
| `stable_rank`    | `sum s^2 / s_1^2`                                    | 0           |
| `effective_rank` | `exp(-sum p log p)`, `p = s / sum s` (Roy & Vetterli) | 0           |
| `r90`            | `min k: sum_{i<=k} s_i^2 >= 0.9 sum s^2` (Biderman)  | 0           |

A non-zero update has all three ranks >= 1; a zero update reports 0 for each (never NaN).
Singular values below `s_1 * eps_fp32 * max(shape)` (the `torch.linalg.matrix_rank`
tolerance) are rounding noise and do not count towards `effective_rank` and `r90`.
A ratio over a zero `W0` is 0 for a zero update and `inf` otherwise.

Row drift (DoRA paper Eqs. 3-4, per output row `i` of the `(out, in)` weight):
`mag_drift = mean_i |m_t,i - m_0,i|` with `m = ||W[i, :]||` (for DoRA `m_t` is the learned
magnitude) and `dir_drift = mean_i (1 - cos(W_t[i, :], W0[i, :]))`. Rows where both norms
are zero count as unchanged (cos 1), rows where one is zero as orthogonal (cos 0).

All functions are branch-free on tensor values (no host sync) and return 0-d tensors in the
accumulation dtype (float64, float32 on MPS).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_peft.adapters.base import accumulation_dtype as acc_dtype  # float64, float32 on MPS

EPS32 = torch.finfo(torch.float32).eps
# An update this small relative to W0 is fp32 rounding (e.g. DoRA's m / ||V|| at init).
ZERO_UPDATE_RTOL = 4 * EPS32

# The metric names every module has; a method's own extras are named by the method itself,
# and `report.METRICS` (the CSV columns) puts them together.
SPECTRAL_METRICS = ("fro_norm", "rel_norm", "spectral_ratio", "stable_rank", "effective_rank", "r90")
DRIFT_METRICS = ("mag_drift", "dir_drift")
# Under merge-and-restart (docs/restart.md): the cycle count and the update summed over every
# cycle, `W_eff - W_orig` against the weight before the first restart (the metrics above keep
# measuring the current cycle's update against the current base).
CUMULATIVE_METRICS = ("restarts", "cum_rel_norm", "cum_effective_rank", "cum_rank")


def _sorted_values(s: Tensor) -> Tensor:
    s = s.detach().flatten().abs().to(acc_dtype(s.device))
    if s.numel() == 0:
        return s.new_zeros(1)
    return torch.sort(s, descending=True).values  # (n,)


def _denoised(s: Tensor, size: int | None) -> Tensor:
    """Sorted singular values with those below the numerical-rank tolerance set to 0."""
    s = _sorted_values(s)
    tol = s[0] * EPS32 * (size if size is not None else s.numel())
    return torch.where(s > tol, s, torch.zeros_like(s))


def safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """`num / den`, with `0 / 0 = 0` and `x / 0 = inf` (never NaN for finite inputs)."""
    zero = torch.zeros_like(num)
    quotient = num / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, quotient, torch.where(num > 0, zero + math.inf, zero))


def frobenius_norm(s: Tensor) -> Tensor:
    """`||dW||_F` from the singular values of `dW`."""
    return _sorted_values(s).square().sum().sqrt()


def stable_rank(s: Tensor) -> Tensor:
    """`sum s^2 / s_1^2` (0 for a zero update)."""
    s = _sorted_values(s)
    return safe_ratio(s.square().sum(), s[0].square())


def effective_rank(s: Tensor, size: int | None = None) -> Tensor:
    """Entropy rank `exp(-sum p log p)`, `p = s / sum s` (Roy & Vetterli 2007); 0 for a zero update.

    Args:
        s: singular values.
        size: `max(dW.shape)` for the noise tolerance; defaults to `len(s)`.
    """
    s = _denoised(s, size)
    total = s.sum()
    p = s / torch.where(total > 0, total, torch.ones_like(total))
    entropy = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p)).sum()
    return torch.where(total > 0, torch.exp(entropy), torch.zeros_like(total))


def energy_rank(s: Tensor, tau: float = 0.9, size: int | None = None) -> Tensor:
    """`min k` with `sum_{i<=k} s_i^2 >= tau * sum s^2` (`r90` for tau 0.9); 0 for a zero update."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"`tau` must be in (0, 1], got {tau!r}")
    energy = _denoised(s, size).square()
    cumulative = torch.cumsum(energy, 0)
    total = cumulative[-1]
    k = (cumulative < tau * total * (1 - 1e-10)).sum() + 1  # slack: a share of exactly tau counts
    return torch.where(total > 0, k.to(energy.dtype), torch.zeros_like(total))


def spectrum_metrics(
    s: Tensor, w0_fro: Tensor | float, w0_sigma1: Tensor | float, size: int | None = None
) -> dict[str, Tensor]:
    """All spectral metrics of one update from its singular values and the cached `W0` norms.

    Args:
        s: singular values of `dW` (zeros may be omitted).
        w0_fro: `||W0||_F`.
        w0_sigma1: `sigma_1(W0)`.
        size: `max(dW.shape)`, the noise tolerance scale.

    Returns:
        0-d tensors keyed by `SPECTRAL_METRICS`. An update with `||dW||_F <= 4 eps ||W0||_F`
        (fp32 rounding) is reported as exactly zero.
    """
    s = _sorted_values(s)
    w0_fro = torch.as_tensor(w0_fro, dtype=s.dtype, device=s.device)
    w0_sigma1 = torch.as_tensor(w0_sigma1, dtype=s.dtype, device=s.device)
    fro = frobenius_norm(s)
    keep = fro > ZERO_UPDATE_RTOL * w0_fro
    s = torch.where(keep, s, torch.zeros_like(s))
    fro = torch.where(keep, fro, torch.zeros_like(fro))
    return {
        "fro_norm": fro,
        "rel_norm": safe_ratio(fro, w0_fro),
        "spectral_ratio": safe_ratio(s[0], w0_sigma1),
        "stable_rank": stable_rank(s),
        "effective_rank": effective_rank(s, size),
        "r90": energy_rank(s, 0.9, size),
    }


def numerical_rank(s: Tensor, size: int) -> Tensor:
    """Singular values above `s_1 * eps_fp32 * size` (the `torch.linalg.matrix_rank` tolerance)."""
    s = _sorted_values(s)
    return (s > s[0] * EPS32 * size).sum().to(s.dtype) if s.numel() else torch.zeros((), dtype=s.dtype)


def cumulative_metrics(s: Tensor, origin_fro: Tensor, size: int, restarts: int) -> dict[str, Tensor]:
    """`CUMULATIVE_METRICS` from the singular values of `W_eff - W_orig` and `||W_orig||_F`."""
    spectral = spectrum_metrics(s, origin_fro, 1.0, size)
    restarts_t = torch.tensor(float(restarts), dtype=spectral["rel_norm"].dtype, device=s.device)
    rank = torch.where(spectral["fro_norm"] > 0, numerical_rank(s, size).to(restarts_t), torch.zeros_like(restarts_t))
    return {
        "restarts": restarts_t,
        "cum_rel_norm": spectral["rel_norm"],
        "cum_effective_rank": spectral["effective_rank"],
        "cum_rank": rank,
    }


def magnitude_drift(m_t: Tensor, m_0: Tensor) -> Tensor:
    """`mean_i |m_t,i - m_0,i|` over output rows (DoRA paper Eq. 3, absolute)."""
    dtype = acc_dtype(m_t.device)
    return (m_t.to(dtype) - m_0.to(dtype)).abs().mean()


def row_direction_change(dw_sq: Tensor, dot: Tensor, n_0: Tensor) -> Tensor:
    """Per row `1 - cos(W0_i + dW_i, W0_i)` from `||dW_i||^2`, `<dW_i, W0_i>` and `||W0_i||`.

    With `a = <dW_i, W0_i> / ||W0_i||` (the part of `dW_i` along `W0_i`), `p^2 = ||dW_i||^2 - a^2`
    and `u = ||W0_i|| + a`: `1 - cos = p^2 / (n_t (n_t + u))` for `u > 0`, which has no
    cancellation for small updates (the dense `1 - <x, y> / (|x||y|)` loses all digits below
    fp32 rounding), and `1 - u / n_t` otherwise.
    """
    dtype = acc_dtype(dot.device)
    dw_sq, dot, n_0 = dw_sq.to(dtype), dot.to(dtype), n_0.to(dtype)
    n_t = (n_0.square() + 2 * dot + dw_sq).clamp_min(0).sqrt()
    a = dot / torch.where(n_0 > 0, n_0, torch.ones_like(n_0))
    perp_sq = (dw_sq - a.square()).clamp_min(0)
    u = n_0 + a
    safe_t = torch.where(n_t > 0, n_t, torch.ones_like(n_t))
    change = torch.where(u > 0, perp_sq / (safe_t * (safe_t + u.clamp_min(0))), 1 - u / safe_t)
    defined = (n_0 > 0) & (n_t > 0)
    return torch.where(defined, change.clamp(0, 2), (n_0 != n_t).to(dtype))  # both zero: 0; one zero: 1


def direction_drift(w_t: Tensor, w_0: Tensor) -> Tensor:
    """`mean_i (1 - cos(W_t[i, :], W0[i, :]))` from dense `(out, in)` weights (DoRA paper Eq. 4)."""
    w_0 = w_0.detach().float()
    dw = w_t.detach().float() - w_0
    return row_direction_change((dw * dw).sum(1), (dw * w_0).sum(1), w_0.norm(dim=1)).mean()


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (`torch.corrcoef`) over the pairs where both values are finite; NaN when
    undefined (fewer than two such pairs, or no spread)."""
    if len(x) != len(y):
        raise ValueError(f"`x` and `y` must have one length, got {len(x)} and {len(y)}")
    pairs = torch.tensor([(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)])
    if len(pairs) < 2 or bool((pairs.std(dim=0) == 0).any()):
        return math.nan
    return float(torch.corrcoef(pairs.T.double())[0, 1])


def drift_correlation(rows: Iterable[Mapping[str, object]], min_step: int = 1) -> dict[str, float]:
    """Pearson `corr(dir_drift, mag_drift)` per method over a diagnostics table (paper Fig. 2).

    Each row with `step >= min_step` is one (module, checkpoint) point, as in the DoRA paper
    (FT -0.62, DoRA -0.31, LoRA +0.83 there). Rows missing either value are skipped.

    Returns:
        method -> correlation (NaN when fewer than two points or no spread).
    """
    points: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        step, dd, dm = row.get("step"), row.get("dir_drift"), row.get("mag_drift")
        if not isinstance(step, int) or step < min_step or not isinstance(dd, float) or not isinstance(dm, float):
            continue
        xs, ys = points.setdefault(str(row.get("method")), ([], []))
        xs.append(dd)
        ys.append(dm)
    return {method: pearson(xs, ys) for method, (xs, ys) in sorted(points.items())}
