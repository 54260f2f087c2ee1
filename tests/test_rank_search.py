"""Rank search: stops where a synthetic metric curve plateaus, then widens targets in the configured order."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

import pytest
from helpers import tiny_bert, tiny_gpt2, tiny_llama

from lightning_peft import LayerPolicy
from lightning_peft.experiments.rank_search import (
    RankSearchError,
    SearchSettings,
    rank_search,
    search_policy,
    write_search,
)


@dataclass
class FakeRecord:
    name: str
    metrics: dict[str, float]
    trainable_params: int
    status: str = "ok"
    error: str | None = None
    step_time_median_s: float = 0.1
    peak_memory_mb: float = 100.0
    run_dir: str = ""


# validation accuracy by (targets, rank): rises quickly, flattens after r=4; attention helps, all Linear barely
CURVE = {
    "qv": {1: 0.50, 2: 0.60, 4: 0.68, 8: 0.685, 16: 0.69, 32: 0.70},
    "attention": {4: 0.73},
    "all_linear": {4: 0.732},
}
WIDTH = {"qv": 2, "attention": 4, "all_linear": 7}


@dataclass
class Synthetic:
    curve: dict = field(default_factory=lambda: CURVE)
    fail: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)

    def __call__(self, variant) -> FakeRecord:
        self.calls.append(variant.name)
        params = variant.rank * WIDTH[variant.targets.name] * 100
        if variant.name in self.fail:
            return FakeRecord(variant.name, {}, params, status="failed", error="RuntimeError: boom")
        return FakeRecord(variant.name, {"val_acc": self.curve[variant.targets.name][variant.rank]}, params)


def test_stops_where_the_curve_plateaus_and_widens_in_order():
    evaluate = Synthetic()
    result = rank_search(evaluate, SearchSettings(metric="val_acc", plateau=0.01))
    assert evaluate.calls == ["r1-qv", "r2-qv", "r4-qv", "r8-qv", "r4-attention", "r4-all_linear"]
    assert (result.rank, result.targets) == (4, "attention")
    decisions = {s.name: s.decision for s in result.steps}
    assert decisions["r8-qv"].startswith("plateau: gain +0.005")
    assert decisions["r4-all_linear"].startswith("plateau: gain +0.002")
    assert decisions["r4-attention"].endswith("(chosen)")


def test_widening_order_is_the_configured_one():
    evaluate = Synthetic()
    settings = SearchSettings(metric="val_acc", plateau=0.01, widen=["qv", "all_linear", "attention"])
    result = rank_search(evaluate, settings)
    assert evaluate.calls[-2:] == ["r4-all_linear", "r4-attention"]
    # all_linear gains 0.052 over r4-qv and is kept; attention then loses 0.002 to it
    assert result.targets == "all_linear"


def test_a_smaller_plateau_goes_further_and_the_cost_limit_stops_it():
    evaluate = Synthetic()
    result = rank_search(evaluate, SearchSettings(metric="val_acc", plateau=0.004, widen=["qv"]))
    assert result.rank == 32 and evaluate.calls[-1] == "r32-qv"  # every doubling gains >= 0.004
    evaluate = Synthetic()
    limited = SearchSettings(metric="val_acc", plateau=0.004, widen=["qv"], cost_limit=1000)
    result = rank_search(evaluate, limited, estimate=lambda rank, targets: rank * WIDTH[targets.name] * 100)
    assert evaluate.calls == ["r1-qv", "r2-qv", "r4-qv"]  # r8-qv (1,600 params) is never run
    assert result.rank == 4 and result.steps[-1].status == "skipped"
    evaluate = Synthetic()
    by_time = SearchSettings(metric="val_acc", plateau=0.0, widen=["qv"], cost_key="peak_memory_mb", cost_limit=50)
    with pytest.raises(RankSearchError, match="no rank could be kept: r1-qv cost 100 > limit 50"):
        rank_search(evaluate, by_time)


def test_a_failed_variant_ends_its_phase_and_min_mode():
    evaluate = Synthetic(fail={"r4-qv"})
    result = rank_search(evaluate, SearchSettings(metric="val_acc", plateau=0.01, widen=["qv"]))
    assert result.rank == 2 and result.steps[-1].decision == "failed: RuntimeError: boom"
    loss = {"qv": {r: 1 - v for r, v in CURVE["qv"].items()}}
    result = rank_search(Synthetic(curve=loss), SearchSettings(metric="val_acc", mode="min", widen=["qv"]))
    assert result.rank == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"widen": ["qv", "mlp_only"]}, "unknown widening step 'mlp_only' \\(step 1\\)"),
        ({"widen": []}, "`widen` is empty"),
        ({"widen": [{"mlp": []}]}, "needs a non-empty list of module globs"),
        ({"ranks": [4, 2]}, "strictly increasing"),
        ({"ranks": [0, 2]}, "positive integers"),
        ({"mode": "maximise"}, "`mode` must be"),
        ({"plateau": -0.1}, "`plateau`"),
    ],
)
def test_bad_settings_fail_before_any_run(kwargs, match):
    evaluate = Synthetic()
    with pytest.raises(RankSearchError, match=match):
        rank_search(evaluate, SearchSettings(metric="val_acc", **kwargs))
    assert evaluate.calls == []


@pytest.mark.parametrize(
    "builder, step, kinds",
    [
        (tiny_llama, "qv", {"self_attn.q_proj", "self_attn.v_proj"}),
        (tiny_llama, "attention", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}),
        (tiny_bert, "qv", {"attention.self.query", "attention.self.value"}),
        (
            tiny_bert,
            "attention",
            {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"},
        ),
        (tiny_gpt2, "attention", {"attn.c_attn", "attn.c_proj"}),
        (tiny_gpt2, "all_linear", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    ],
)
def test_built_in_target_sets_pick_the_named_matrices(builder, step, kinds):
    settings = SearchSettings(metric="val_acc", ranks=[2, 4], widen=[step])
    keep = [{"name": "head", "method": "full", "modules": ["lm_head"]}] if builder is tiny_llama else []
    plan = LayerPolicy.from_dict(search_policy(settings, 4, settings.targets[0], keep)).resolve(builder())
    adapted = [r for r in plan.rows if r.method == "lora"]
    assert {r.kind for r in adapted} == kinds
    assert {r.block for r in adapted} == set(range(6))
    assert all(r.hparams == {"r": 4, "alpha": 8} for r in adapted)  # alpha / r = 2 at every rank
    fixed = SearchSettings(metric="val_acc", ranks=[2, 4], widen=[step], alpha=2)  # the article's fixed alpha
    rows = LayerPolicy.from_dict(search_policy(fixed, 4, fixed.targets[0])).resolve(builder()).rows
    assert {r.hparams["alpha"] for r in rows} == {2}
    assert [r.name for r in plan.rows if r.method == "full"] == (["lm_head"] if keep else [])


def test_report_files(tmp_path):
    settings = SearchSettings(metric="val_acc", plateau=0.01)
    result = rank_search(Synthetic(), settings)
    csv_path, png = write_search(result, settings, tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["variant"] for r in rows] == [s.name for s in result.steps]
    assert rows[4]["decision"].endswith("(chosen)") and float(rows[4]["val_acc"]) == 0.73
    assert png.read_bytes()[:4] == b"\x89PNG"
