"""The rich table and the figures of a comparison (from its records and CSV files).

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas (no pyplot state):

- `metric_vs_params.png`: the learning metric against trainable parameters, Pareto front
  (more metric for fewer parameters) marked.
- `learn_vs_forget.png`: learning against forgetting, one point per variant (the end of its
  run) with its trajectory over validations, and both against training steps.
- `depth_diagnostics.png`: per-block relative update norm and effective rank of every variant.

Forgetting is plotted as `-change` of the forgetting metric (`forget/<m>_change`), so
larger = more of the prior knowledge lost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_peft.experiments.records import DEPTH_FILE, VariantRecord, read_csv, read_curves

__all__ = ["comparison_table", "default_metrics", "draw_comparison", "pareto_front"]

FIGURES = ("metric_vs_params", "learn_vs_forget", "depth_diagnostics")


def default_metrics(
    records: Sequence[VariantRecord], metric: str | None = None, forget_metric: str | None = None
) -> tuple[str | None, str | None]:
    """The learning metric (first `val_*acc*`, else first `val_*` that is not a loss) and the
    forgetting metric (first `forget/*_change`) found in the records, unless given."""
    names = sorted({k for r in records for k in r.metrics})
    if metric is None:
        vals = [n for n in names if n.startswith("val_") and "loss" not in n]
        metric = next((n for n in vals if "acc" in n), vals[0] if vals else None)
    if forget_metric is None:
        forget_metric = next((n for n in names if n.startswith("forget/") and n.endswith("_change")), None)
    return metric, forget_metric


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: fewer-or-equal cost (x) and higher value (y)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _ok(records: Sequence[VariantRecord], metric: str | None) -> list[VariantRecord]:
    return [r for r in records if r.status == "ok" and metric and math.isfinite(r.metrics.get(metric, math.nan))]


def _fmt(value: Any, spec: str) -> str:
    return "-" if not isinstance(value, (int, float)) or not math.isfinite(value) else format(value, spec)


def comparison_table(records: Sequence[VariantRecord], metric: str | None = None, forget_metric: str | None = None):
    """A rich `Table`: one row per variant, Pareto-front variants starred."""
    from rich.table import Table

    metric, forget_metric = default_metrics(records, metric, forget_metric)
    ok = _ok(records, metric)
    front = {ok[i].name for i in pareto_front([(r.trainable_params, r.metrics[metric]) for r in ok])}
    table = Table(title="lightning-peft compare")
    for col in ("variant", "status", "trainable", metric or "metric", forget_metric or "forgetting",
                "ms/step", "peak MB"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("variant", "status") else "right")
    for r in records:
        status = "ok" if r.status == "ok" else f"[red]failed[/red]: {(r.error or '')[:60]}"
        table.add_row(
            f"{r.name} *" if r.name in front else r.name,
            status,
            f"{r.trainable_params:,}",
            _fmt(r.metrics.get(metric or "", math.nan), ".4f"),
            _fmt(r.metrics.get(forget_metric or "", math.nan), "+.4f"),
            _fmt(r.step_time_median_s * 1e3, ".1f"),
            _fmt(r.peak_memory_mb, ".0f"),
        )
    table.caption = f"* = Pareto front of {metric} vs trainable parameters"
    return table


def _figure(ncols: int = 1, width: float = 5.2, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def metric_vs_params_figure(records: Sequence[VariantRecord], metric: str):
    ok = _ok(records, metric)
    fig, (ax,) = _figure()
    points = [(r.trainable_params, r.metrics[metric]) for r in ok]
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=3)
    for r, (x, y) in zip(ok, points, strict=True):
        ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = [points[i] for i in pareto_front(points)]
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", label="Pareto front")
        ax.legend(loc="lower right", fontsize=8)
    if points and min(p[0] for p in points) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs trainable parameters")
    return fig


def learn_vs_forget_figure(records: Sequence[VariantRecord], curves: dict[str, list[dict]], metric: str, forget: str):
    """Left: learning vs forgetting, end points and trajectories; middle/right: both over steps."""
    fig, (ax, ax_learn, ax_forget) = _figure(ncols=3, width=4.6)
    colors = {r.name: f"C{i % 10}" for i, r in enumerate(records)}
    for r in _ok(records, metric):
        rows = [c for c in curves.get(r.name, []) if math.isfinite(c.get(metric, math.nan))]
        steps = [c["step"] for c in rows]
        learn = [c[metric] for c in rows]
        lost = [-c.get(forget, math.nan) for c in rows]
        color = colors[r.name]
        ax.plot(lost, learn, color=color, alpha=0.35, marker=".", linewidth=1)
        ax.scatter([-r.metrics.get(forget, math.nan)], [r.metrics[metric]], color=color, zorder=3, label=r.name)
        ax_learn.plot(steps, learn, color=color, marker=".", label=r.name)
        ax_forget.plot(steps, lost, color=color, marker=".", label=r.name)
    ax.set_xlabel(f"forgetting (-{forget})")
    ax.set_ylabel(f"learning ({metric})")
    ax.set_title("learning vs forgetting (dot = end of run)")
    ax.legend(fontsize=7)
    ax_learn.set_xlabel("step")
    ax_learn.set_ylabel(metric)
    ax_learn.set_title("learning over steps")
    ax_forget.set_xlabel("step")
    ax_forget.set_ylabel(f"-{forget}")
    ax_forget.set_title("forgetting over steps")
    return fig


def depth_figure(depth_rows: Sequence[dict[str, str]]):
    """Per-block mean relative update norm and effective rank, one line per variant."""
    fig, axes = _figure(ncols=2)
    by_variant: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for row in depth_rows:
        if row.get("block") in (None, "", "None"):
            continue
        cell = by_variant.setdefault(row["variant"], {}).setdefault(int(float(row["block"])), [])
        cell.append((float(row["rel_norm"] or "nan"), float(row["effective_rank"] or "nan")))
    for i, (name, blocks) in enumerate(by_variant.items()):
        xs = sorted(blocks)
        for k, ax in enumerate(axes):
            ys = [sum(v[k] for v in blocks[b]) / len(blocks[b]) for b in xs]
            ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=name)
    for ax, label in zip(axes, ("mean rel. update norm", "mean effective rank"), strict=True):
        ax.set_xlabel("block (depth)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} by depth (last step)")
    if by_variant:
        axes[0].legend(fontsize=7)
    return fig


def draw_comparison(
    out_dir: str | Path,
    records: Sequence[VariantRecord],
    metric: str | None = None,
    forget_metric: str | None = None,
) -> dict[str, Path]:
    """Write the comparison figures as PNG into `out_dir`; returns name -> path of those drawn.

    A figure without data (no learning metric, no forgetting metric, no diagnostics) is skipped.
    """
    out_dir = Path(out_dir)
    metric, forget_metric = default_metrics(records, metric, forget_metric)
    figures = {}
    if metric is not None:
        figures["metric_vs_params"] = metric_vs_params_figure(records, metric)
        if forget_metric is not None:
            curves = read_curves(out_dir, [r.name for r in records])
            figures["learn_vs_forget"] = learn_vs_forget_figure(records, curves, metric, forget_metric)
    depth_rows = read_csv(out_dir / DEPTH_FILE)
    if depth_rows:
        figures["depth_diagnostics"] = depth_figure(depth_rows)
    paths = {}
    for name, fig in figures.items():
        paths[name] = out_dir / f"{name}.png"
        fig.savefig(paths[name], dpi=90)
    return paths
