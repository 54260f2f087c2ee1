"""The diagnostics table on disk, its figures and its rich summary (also for finished runs).

The table is long-format CSV, one row per (logged step, module), columns `COLUMNS`; empty
cells are values that were not measured (a metric another method does not have, or a stage
that failed). Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, so no
pyplot state or global backend is touched.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_peft.adapters import diagnostic_names, method_label

from .metrics import CUMULATIVE_METRICS, DRIFT_METRICS, SPECTRAL_METRICS, drift_correlation

TABLE_FILE = "update_diagnostics.csv"
METRICS = (*SPECTRAL_METRICS, *DRIFT_METRICS, *diagnostic_names(), "grad_norm", *CUMULATIVE_METRICS)
KEY_COLUMNS = ("step", "module", "block", "kind", "method")
COLUMNS = (*KEY_COLUMNS, *METRICS)


class NotADiagnosticsTable(ValueError):
    """A CSV that is not an `update_diagnostics.csv` (a foreign file handed to `report`)."""


Row = dict[str, Any]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def append_rows(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append rows to the table, writing the header when the file is new or empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(COLUMNS)
        writer.writerows([_cell(row.get(c)) for c in COLUMNS] for row in rows)


def _parse(row: Mapping[str, str]) -> Row:
    out: Row = {"step": int(row["step"]), "module": row["module"], "kind": row["kind"], "method": row["method"]}
    out["block"] = int(row["block"]) if row.get("block") not in (None, "") else None
    for name in METRICS:
        text = row.get(name)
        out[name] = float(text) if text not in (None, "") else math.nan
    return out


def read_table(path: str | Path) -> list[Row]:
    """Read a diagnostics CSV (a file, or a log dir holding `update_diagnostics.csv`)."""
    path = Path(path)
    if path.is_dir():
        path = path / TABLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No diagnostics table at {str(path)!r}; was UpdateDiagnostics in the run's callbacks?")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in KEY_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise NotADiagnosticsTable(f"{path}: not a diagnostics table (missing columns {missing})")
        return [_parse(r) for r in reader]


# -- summaries -------------------------------------------------------------------------------


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def last_step(rows: Sequence[Row]) -> list[Row]:
    """The rows of the last logged step."""
    if not rows:
        return []
    step = max(r["step"] for r in rows)
    return [r for r in rows if r["step"] == step]


def _fmt(value: float, digits: int = 4) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}g}"


def summary_table(rows: Sequence[Row], title: str | None = None):
    """A rich `Table` of the last step: per block, method(s), mean rel. norm, mean effective rank."""
    from rich.table import Table

    final = last_step(rows)
    step = final[0]["step"] if final else 0
    table = Table(title=title or f"lightning-peft update diagnostics (step {step})")
    for col in ("block", "method(s)", "modules", "mean rel. norm", "mean eff. rank", "mean r90"):
        table.add_column(col, justify="left" if col == "method(s)" else "right")
    groups: dict[int | None, list[Row]] = defaultdict(list)
    for r in final:
        groups[r["block"]].append(r)
    order = sorted(groups, key=lambda b: (b is None, b if b is not None else 0))
    for block in order:
        rs = groups[block]
        methods = ", ".join(sorted({r["method"] for r in rs}))
        table.add_row(
            "none" if block is None else str(block),
            methods,
            str(len(rs)),
            _fmt(_mean(r["rel_norm"] for r in rs)),
            _fmt(_mean(r["effective_rank"] for r in rs), 3),
            _fmt(_mean(r["r90"] for r in rs), 3),
        )
    corr = drift_correlation(rows)
    captions = []
    if corr:
        captions.append(
            "corr(dir drift, mag drift) by method: " + ", ".join(f"{m} {_fmt(v, 2)}" for m, v in corr.items())
        )
    tracked = [r for r in final if math.isfinite(r.get("cum_effective_rank", math.nan))]  # not `full` modules
    if tracked:
        captions.append(
            f"after {int(max(r['restarts'] for r in tracked))} restart(s): mean eff. rank of the update over all "
            f"cycles {_fmt(_mean(r['cum_effective_rank'] for r in tracked), 3)}"
        )
    if captions:
        table.caption = "\n".join(captions)
    return table


# -- figures ---------------------------------------------------------------------------------


def _figure(ncols: int = 1, width: float = 6.4, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def heatmap_figure(rows: Sequence[Row], metric: str = "rel_norm"):
    """Block depth x module kind of `metric` at the last step (modules outside blocks omitted)."""
    import numpy as np

    final = [r for r in last_step(rows) if r["block"] is not None]
    kinds = list(dict.fromkeys(r["kind"] for r in final))
    blocks = sorted({r["block"] for r in final})
    grid = np.full((len(blocks), len(kinds)), np.nan)
    labels: dict[tuple[int, int], str] = {}
    for r in final:
        i, j = blocks.index(r["block"]), kinds.index(r["kind"])
        grid[i, j] = r[metric]
        labels[i, j] = method_label(r["method"])
    fig, (ax,) = _figure(width=max(4.0, 1.1 * len(kinds) + 2), height=max(3.0, 0.35 * len(blocks) + 1.5))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", origin="lower")
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=8)
    ax.set_xlabel("module kind")
    ax.set_ylabel("block depth")
    if grid.size <= 400:  # method labels (as each method declares it) in the cells of small grids
        for (i, j), text in labels.items():
            ax.text(j, i, text, ha="center", va="center", color="white", fontsize=7)
    step = final[0]["step"] if final else 0
    ax.set_title(f"{metric} at step {step} (cells: adapter method)", fontsize=9)
    return fig


def _plot_means(ax, rows: Sequence[Row], x_key: str, metric: str, break_gaps: bool = False, **style: Any) -> None:
    """One line per method: the mean of `metric` over the rows sharing each `x_key` value.

    With `break_gaps`, the line breaks where consecutive x values are not adjacent integers
    (blocks a hybrid policy gives to another method).
    """
    by_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_method[r["method"]][r[x_key]].append(r[metric])
    for method, groups in sorted(by_method.items()):
        xs: list[float] = []
        ys: list[float] = []
        for x in sorted(groups):
            if break_gaps and xs and x != xs[-1] + 1:
                xs.append(x - 0.5)
                ys.append(math.nan)
            xs.append(x)
            ys.append(_mean(groups[x]))
        ax.plot(xs, ys, marker="o", label=method, **style)
    if by_method:
        ax.legend()


def curves_figure(rows: Sequence[Row], metric: str = "rel_norm"):
    """Mean `metric` over modules per method, against the step."""
    fig, (ax,) = _figure()
    _plot_means(ax, rows, "step", metric, markersize=3)
    ax.set(xlabel="step", ylabel=f"mean {metric}")
    ax.set_title(f"mean {metric} per method", fontsize=9)
    return fig


def has_cumulative(rows: Sequence[Row]) -> bool:
    """Whether the table holds merge-and-restart cumulative metrics (`MergeRestart` with tracking)."""
    return any(math.isfinite(r.get("cum_effective_rank", math.nan)) for r in rows)


def cumulative_figure(rows: Sequence[Row]):
    """Effective rank of the update summed over all restart cycles, and of the current cycle's, against the step.

    Restarts (vertical lines) reset the current cycle's update; the cumulative rank should climb across them.
    """
    fig, axes = _figure(ncols=2)
    tracked = [r for r in rows if math.isfinite(r.get("cum_effective_rank", math.nan))]
    for ax, metric, title in (
        (axes[0], "cum_effective_rank", "all cycles: W_eff - W_orig"),
        (axes[1], "effective_rank", "current cycle: W_eff - W_base"),
    ):
        _plot_means(ax, tracked, "step", metric, markersize=3)
        ax.set(xlabel="step", ylabel=f"mean {metric}")
        ax.set_title(f"effective rank of the update, {title}", fontsize=9)
    restarts: dict[float, int] = {}
    for r in tracked:
        restarts.setdefault(r["restarts"], r["step"])
    for count, step in restarts.items():
        if count > 0:
            for ax in axes:
                ax.axvline(step, color="grey", linewidth=0.6, linestyle=":")
    return fig


def ranks_figure(rows: Sequence[Row]):
    """Effective rank and r90 of the update per block depth, by method, at the last step."""
    fig, axes = _figure(ncols=2)
    final = [r for r in last_step(rows) if r["block"] is not None]
    for ax, metric in zip(axes, ("effective_rank", "r90"), strict=True):
        _plot_means(ax, final, "block", metric, break_gaps=True)
        ax.set(xlabel="block depth", ylabel=f"mean {metric}")
        ax.set_title(f"{metric} of dW by depth", fontsize=9)
    return fig


def drift_figure(rows: Sequence[Row]):
    """Direction drift against magnitude drift (DoRA paper Fig. 2), one point per module and step."""
    fig, (ax,) = _figure()
    corr = drift_correlation(rows)
    points: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for r in rows:
        if r["step"] > 0 and math.isfinite(r["dir_drift"]) and math.isfinite(r["mag_drift"]):
            points[r["method"]][0].append(r["dir_drift"])
            points[r["method"]][1].append(r["mag_drift"])
    for method, (xs, ys) in sorted(points.items()):
        ax.scatter(xs, ys, s=10, label=f"{method} (r={_fmt(corr.get(method, math.nan), 2)})")
    ax.set_xlabel("direction drift dD")
    ax.set_ylabel("magnitude drift dM")
    ax.set_title("dD vs dM per module and step", fontsize=9)
    if points:
        ax.legend()
    return fig


def draw_figures(rows: Sequence[Row], out_dir: str | Path) -> dict[str, Any]:
    """Draw every figure once, save `<name>.png` into `out_dir`; return name -> RGB image `(H, W, 3)`."""
    import numpy as np
    from matplotlib.image import imsave

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "updates_heatmap": heatmap_figure(rows),
        "updates_curves": curves_figure(rows),
        "updates_ranks": ranks_figure(rows),
        "updates_drift": drift_figure(rows),
    }
    if has_cumulative(rows):
        figures["updates_cumulative"] = cumulative_figure(rows)
    images = {}
    for name, fig in figures.items():
        fig.canvas.draw()  # rendered once: the PNG and the TensorBoard image share the pixels
        images[name] = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        imsave(out_dir / f"{name}.png", images[name])
    return images


def render_report(log_dir: str | Path, plots: bool = True, out_dir: str | Path | None = None):
    """Re-render a finished run's summary table (and figures) from its diagnostics CSV.

    Args:
        log_dir: the run's log dir (or the CSV file itself).
        plots: redraw the PNG figures.
        out_dir: where the figures go; defaults to the CSV's folder.

    Returns:
        The rich `Table` (print it with `rich.print`).

    Raises:
        FileNotFoundError: no diagnostics table there.
    """
    path = Path(log_dir)
    rows = read_table(path)
    if plots:
        target = Path(out_dir) if out_dir is not None else (path if path.is_dir() else path.parent)
        draw_figures(rows, target)
    return summary_table(rows)
