"""Per-layer update-norm diagnostics (docs/methods.md): pure metrics, per-module probes, a callback, reports."""

from .callback import UpdateDiagnostics, build_probes
from .metrics import (
    direction_drift,
    drift_correlation,
    effective_rank,
    energy_rank,
    frobenius_norm,
    magnitude_drift,
    pearson,
    spectrum_metrics,
    stable_rank,
)
from .report import COLUMNS, METRICS, TABLE_FILE, draw_figures, read_table, render_report, summary_table
from .spectra import UpdateProbe, dense_singular_values

__all__ = [
    "COLUMNS",
    "METRICS",
    "TABLE_FILE",
    "UpdateDiagnostics",
    "UpdateProbe",
    "build_probes",
    "dense_singular_values",
    "direction_drift",
    "draw_figures",
    "drift_correlation",
    "effective_rank",
    "energy_rank",
    "frobenius_norm",
    "magnitude_drift",
    "pearson",
    "read_table",
    "render_report",
    "spectrum_metrics",
    "stable_rank",
    "summary_table",
]
