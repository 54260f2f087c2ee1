"""Diagnostics of adapters as they are now, without training: one table row per adapted module.

For adapters trained elsewhere (a peft folder read by `import_peft`, an adapter file): the
same metrics `UpdateDiagnostics` logs during `fit`, measured once and written as the
`update_diagnostics.csv` that `lightning-peft report` renders.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .callback import build_probes
from .report import METRICS, TABLE_FILE, Row, append_rows


def measure_adapters(model: nn.Module, step: int = 0) -> list[Row]:
    """One row per adapted module of `model` (the update is measured against the current base weights)."""
    rows: list[Row] = []
    for probe in build_probes(model, snapshot=False):
        if not probe.is_adapter:  # a `full` module: its starting weights are unknown here
            continue
        values = probe.measure()  # a failing stage raises: a one-off measurement has no later step to retry
        row: Row = {"step": step, "module": probe.name, "block": probe.block, "kind": probe.kind}
        row["method"] = probe.method
        for metric in METRICS:
            value = values.get(metric)
            row[metric] = float(value) if isinstance(value, torch.Tensor) else math.nan
        rows.append(row)
    return rows


def write_snapshot(model: nn.Module, out_dir: str | Path) -> Path:
    """Measure `model`'s adapters and write `out_dir/update_diagnostics.csv` (replacing an old one)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TABLE_FILE
    rows = measure_adapters(model)
    if not rows:
        raise ValueError(f"{type(model).__name__} has no adapted modules to measure")
    if path.exists():
        path.unlink()
    append_rows(path, rows)
    return path
