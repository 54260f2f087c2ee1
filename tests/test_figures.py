"""Figures draw the data they are given: the plotted arrays are checked, not the PNG's size."""

import math

import numpy as np
import pytest

from lightning_peft.diagnostics.report import curves_figure, drift_figure, heatmap_figure, ranks_figure
from lightning_peft.experiments.figures import depth_figure, learn_vs_forget_figure, metric_vs_params_figure
from lightning_peft.experiments.records import VariantRecord


def _row(step, block, kind, method, **metrics):
    base = {"rel_norm": math.nan, "effective_rank": math.nan, "r90": math.nan, "dir_drift": math.nan}
    return {"step": step, "module": f"layers.{block}.{kind}", "block": block, "kind": kind, "method": method,
            **base, "mag_drift": math.nan, **metrics}  # fmt: skip


ROWS = [
    _row(5, 0, "q_proj", "lora", rel_norm=0.10, effective_rank=2.0, r90=1.0),
    _row(5, 0, "up_proj", "lora", rel_norm=0.30, effective_rank=4.0, r90=3.0),
    _row(5, 1, "q_proj", "mora", rel_norm=0.20, effective_rank=6.0, r90=5.0),
    _row(5, 1, "up_proj", "mora", rel_norm=0.40, effective_rank=8.0, r90=7.0),
    _row(10, 0, "q_proj", "lora", rel_norm=0.15, effective_rank=2.5, r90=1.0, dir_drift=0.1, mag_drift=0.2),
    _row(10, 0, "up_proj", "lora", rel_norm=0.35, effective_rank=4.5, r90=3.0, dir_drift=0.3, mag_drift=0.4),
    _row(10, 1, "q_proj", "mora", rel_norm=0.25, effective_rank=6.5, r90=5.0),
    _row(10, 1, "up_proj", "mora", rel_norm=0.45, effective_rank=8.5, r90=7.0),
    _row(10, None, "lm_head", "full", rel_norm=9.0),  # outside the blocks: not in depth figures
]


def test_heatmap_cells_are_the_last_steps_metric_by_block_and_kind():
    fig = heatmap_figure(ROWS)
    grid = np.ma.filled(fig.axes[0].images[0].get_array(), np.nan)
    np.testing.assert_allclose(grid, [[0.15, 0.35], [0.25, 0.45]])  # rows: blocks 0, 1; columns: q_proj, up_proj
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["q_proj", "up_proj"]
    assert "step 10" in ax.get_title()


def test_curves_plot_the_mean_per_method_over_steps():
    fig = curves_figure(ROWS)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    np.testing.assert_allclose(lines["lora"].get_xdata(), [5, 10])
    np.testing.assert_allclose(lines["lora"].get_ydata(), [0.20, 0.25])
    np.testing.assert_allclose(lines["mora"].get_ydata(), [0.30, 0.35])
    np.testing.assert_allclose(lines["full"].get_ydata(), [9.0])


def test_ranks_plot_the_last_step_per_block_and_leave_gaps_between_methods():
    fig = ranks_figure(ROWS)
    effective = {line.get_label(): line for line in fig.axes[0].lines}
    np.testing.assert_allclose(effective["lora"].get_xdata(), [0])
    np.testing.assert_allclose(effective["lora"].get_ydata(), [3.5])
    np.testing.assert_allclose(effective["mora"].get_ydata(), [7.5])
    r90 = {line.get_label(): line for line in fig.axes[1].lines}
    np.testing.assert_allclose(r90["mora"].get_ydata(), [6.0])
    assert "full" not in effective  # a module outside the blocks has no depth


def test_drift_scatter_holds_every_measured_point():
    fig = drift_figure(ROWS)
    (points,) = fig.axes[0].collections
    np.testing.assert_allclose(points.get_offsets(), [[0.1, 0.2], [0.3, 0.4]])


def _record(name, params, acc, forget):
    return VariantRecord(name, "ok", None, {"val_acc": acc, "forget/loss": forget}, params, 0.1, 1.0, name)


def test_comparison_figures_plot_each_variants_numbers():
    records = [_record("small", 100, 0.5, -0.1), _record("big", 1000, 0.8, -0.3), _record("worse", 2000, 0.7, -0.2)]
    fig = metric_vs_params_figure(records, "val_acc")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), [[100, 0.5], [1000, 0.8], [2000, 0.7]])
    (front,) = [line for line in ax.lines if line.get_label() == "Pareto front"]
    np.testing.assert_allclose(front.get_xdata(), [100, 1000])  # 'worse' costs more and scores less: off the front

    curves = {"small": [{"step": 1.0, "val_acc": 0.2, "forget/loss": -0.05}, {"step": 2.0, "val_acc": 0.5}]}
    fig = learn_vs_forget_figure(records[:1], curves, "val_acc", "forget/loss")
    learn_line = fig.axes[1].lines[0]
    np.testing.assert_allclose(learn_line.get_xdata(), [1.0, 2.0])
    np.testing.assert_allclose(learn_line.get_ydata(), [0.2, 0.5])
    np.testing.assert_allclose(fig.axes[0].collections[0].get_offsets(), [[0.1, 0.5]])  # forgetting is -forget/loss


def test_depth_figure_averages_per_variant_and_block():
    rows = [
        {"variant": "a", "block": "0", "rel_norm": "0.1", "effective_rank": "2"},
        {"variant": "a", "block": "0", "rel_norm": "0.3", "effective_rank": "4"},
        {"variant": "a", "block": "1", "rel_norm": "0.5", "effective_rank": "6"},
        {"variant": "a", "block": "", "rel_norm": "9", "effective_rank": "9"},
    ]
    fig = depth_figure(rows)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [0.2, 0.5])
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), [3.0, 6.0])


@pytest.mark.parametrize("figure", [heatmap_figure, curves_figure, ranks_figure, drift_figure])
def test_an_empty_table_draws_an_empty_figure(figure):
    fig = figure([])
    fig.canvas.draw()
