"""`suggest`: synthetic pilot evidence -> the expected method per layer, within the budget exactly."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from helpers import LLAMA_KINDS, REPO, CausalLMModule, tiny_bert

from lightning_peft import LayerPolicy
from lightning_peft.diagnostics import direction_drift, magnitude_drift
from lightning_peft.experiments.suggest import (
    ModuleEvidence,
    SuggestError,
    SuggestSettings,
    check_before_pilot,
    mag_angle_ratio,
    pilot_policy,
    suggest,
    suggest_from_evidence,
)

KINDS = LLAMA_KINDS


def expected_method(block: int, kind: str) -> str:
    if block == 2:
        return "none"  # tiny update
    if block in (0, 5):
        return "mora"  # rank-saturated
    if block == 1 and kind == "self_attn.q_proj":
        return "dora"  # magnitude-led
    if block == 3 and kind == "mlp.down_proj":
        return "lora-low"  # small update
    return "lora"


def synthetic_evidence(model) -> list[ModuleEvidence]:
    """Pilot measurements (LoRA r=4) designed so each module falls in a known tier."""
    plan = LayerPolicy.from_dict(pilot_policy(SuggestSettings(budget=10**9), [])).resolve(model)
    out = []
    for row in plan.rows:
        want = expected_method(row.block, row.kind)
        rel = {"none": 0.001, "lora-low": 0.2}.get(want, 1.0)
        r90 = 4 if want == "mora" else 2
        ratio = 3.0 if want == "dora" else 0.2
        out.append(
            ModuleEvidence(row.name, row.block, row.kind, row.in_features, row.out_features, rel, r90, 2.5, ratio, 4)
        )
    return out


def module_methods(plan) -> dict[str, str]:
    return {r.name: r.method + ("-low" if r.method == "lora" and r.hparams["r"] < 4 else "") for r in plan.rows}


@pytest.mark.parametrize("budget", [6_000, 20_000, 40_000])  # below the ceiling: the layers hold 55,296
def test_expected_method_per_layer_within_the_budget_exactly(tmp_path, budget):
    model = CausalLMModule()
    evidence = synthetic_evidence(model)
    result = suggest_from_evidence(evidence, model, SuggestSettings(budget=budget), tmp_path / "policy.yaml")
    plan = LayerPolicy.from_yaml(result.policy_path).resolve(model)  # an independent resolve of the written file
    assert plan.trainable_params == result.trainable_params <= budget
    assert {r.name: r.method for r in plan.rows} == {n: m for n, m in result.methods().items() if m != "none"}
    for e in evidence:
        got = result.methods()[e.name]
        want = expected_method(e.block, e.kind)
        assert got == want.removesuffix("-low"), e.name
    low = [r for r in plan.rows if r.kind == "mlp.down_proj" and r.block == 3]
    base = [r for r in plan.rows if r.method == "lora" and r not in low]
    assert low[0].hparams["r"] < base[0].hparams["r"]
    # maximal: one more rank on any rule would break the budget
    for rule in result.rules:
        rule.rank += 1
        assert sum(c.params() for c in result.rules) > budget or rule.rank > rule.max_rank()
        rule.rank -= 1
    text = result.policy_path.read_text()
    assert "rank-saturated pilot update" in text and "magnitude-led update" in text and "left frozen" in text
    assert f"trainable parameters: {plan.trainable_params:,} of a budget of {budget:,}" in text


def test_rates_per_rule_and_carried_head(tmp_path):
    model = CausalLMModule()
    carried = [{"name": "head", "method": "full", "modules": ["lm_head"]}]
    head = sum(p.numel() for p in model.model.lm_head.parameters())
    settings = SuggestSettings(budget=head + 10_000, lr_scales={"mora": 2.0, "lora": 1.0, "dora": 0.5})
    result = suggest_from_evidence(synthetic_evidence(model), model, settings, tmp_path / "p.yaml", carried)
    policy = LayerPolicy.from_yaml(result.policy_path)
    plan = policy.resolve(model)
    assert plan.trainable_params == result.trainable_params <= settings.budget
    assert plan.params_by_method()["full"] == head
    scales = {r.method: r.optim["lr_scale"] for r in plan.rows if r.method != "full"}
    assert scales == {"mora": 2.0, "lora": 1.0, "dora": 0.5}


def test_bert_kinds_that_share_a_suffix_get_exact_patterns(tmp_path):
    """BERT's `output.dense` also suffix-matches `attention.output.dense`: the rule must not take both."""
    model = tiny_bert()
    plan = LayerPolicy.from_dict(pilot_policy(SuggestSettings(budget=10**9), [])).resolve(model)
    evidence = [
        ModuleEvidence(
            r.name,
            r.block,
            r.kind,
            r.in_features,
            r.out_features,
            1.0,
            4 if r.kind == "output.dense" else 1,
            2.0,
            0.1,
            4,
        )
        for r in plan.rows
    ]
    result = suggest_from_evidence(evidence, model, SuggestSettings(budget=30_000), tmp_path / "p.yaml")
    resolved = LayerPolicy.from_yaml(result.policy_path).resolve(model)
    assert {r.kind for r in resolved.rows if r.method == "mora"} == {"output.dense"}
    assert {r.kind for r in resolved.rows if r.method == "lora"} == {r.kind for r in plan.rows} - {"output.dense"}


def test_the_budget_drops_the_least_moved_modules_first(tmp_path):
    model = CausalLMModule()
    evidence = synthetic_evidence(model)
    one = min(e.in_features + e.out_features for e in evidence)  # LoRA r=1 on the smallest layer
    result = suggest_from_evidence(evidence, model, SuggestSettings(budget=3 * one), tmp_path / "p.yaml")
    assert 0 < result.trainable_params <= 3 * one
    kept = [n for n, m in result.methods().items() if m != "none"]
    moved = sorted((e.rel_norm for e in evidence), reverse=True)
    assert all(e.rel_norm >= moved[len(kept) - 1] for e in evidence if e.name in kept)
    assert "dropped: the budget cannot hold it" in result.policy_path.read_text()


def test_mag_angle_ratio_against_brute_force():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(24, 16, generator=g, dtype=torch.float64)
    for dw in (
        0.05 * torch.randn(24, 16, generator=g, dtype=torch.float64),
        0.1 * w0 * torch.rand(24, 1, generator=g, dtype=torch.float64),
    ):
        w = w0 + dw  # the row the diagnostics table would hold, from the diagnostics' own metric functions
        row = {
            "fro_norm": float(dw.norm()),
            "rel_norm": float(dw.norm() / w0.norm()),
            "mag_drift": float(magnitude_drift(w.norm(dim=1), w0.norm(dim=1))),
            "dir_drift": float(direction_drift(w, w0)),
        }
        rel_mag = (w.norm(dim=1) - w0.norm(dim=1)).abs().mean() / w0.norm(dim=1).square().mean().sqrt()
        cos = torch.nn.functional.cosine_similarity(w, w0, dim=1).mean()
        angle = math.acos(min(1.0, float(cos)))
        want = float(rel_mag) / angle if angle > 1e-7 else math.inf
        got = mag_angle_ratio(row, 24)
        assert got == pytest.approx(want, rel=1e-4) if math.isfinite(want) else got > 1e3


# -- bad input: named errors before any run --------------------------------------------------------


def test_budget_smaller_than_any_policy_fails_before_the_pilot(tmp_path):
    # k_proj is 128 -> 64 (2 KV heads of 32): LoRA r=1 there has 192 parameters
    with pytest.raises(SuggestError, match="budget 100 is smaller than any policy: the smallest .* has 192"):
        suggest(REPO / "configs/uuid_lora.yaml", tmp_path / "out", SuggestSettings(budget=100))
    assert not (tmp_path / "out").exists()


def test_pilot_that_adapts_nothing_is_refused():
    model = CausalLMModule()
    with pytest.raises(SuggestError, match=r"the pilot adapts nothing: `pilot_modules` \['no_such_layer'\]"):
        check_before_pilot(model, SuggestSettings(budget=10**6, pilot_modules=["no_such_layer"]), [])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": 0}, "`budget` must be a positive integer"),
        ({"high_rank_method": "hora"}, "`high_rank_method`: Unknown adapter method 'hora'"),
        ({"skip_below": 0.6, "low_below": 0.5}, "`skip_below` .* must not exceed"),
        ({"pilot_modules": []}, "would adapt nothing"),
        ({"lr_scales": {"mora": 0}}, "`lr_scales` must be positive"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(SuggestError, match=match):
        SuggestSettings(**{"budget": 1000, **kwargs})


def test_the_written_policy_is_valid_yaml_with_comments(tmp_path):
    model = CausalLMModule()
    result = suggest_from_evidence(
        synthetic_evidence(model), model, SuggestSettings(budget=20_000), tmp_path / "p.yaml"
    )
    data = yaml.safe_load(result.policy_path.read_text())
    assert [r["name"] for r in data["rules"]][:2] == ["self_attn.q_proj-mora", "self_attn.q_proj-dora"]
