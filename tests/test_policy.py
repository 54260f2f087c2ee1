"""Policy resolution on real HF architectures, depth selectors, matching, and every bad input."""

from __future__ import annotations

import fnmatch
import json
import math
import re

import pytest
import torch
import yaml
from helpers import (
    BLOCK_PREFIX,
    BUILDERS,
    HYBRID,
    LINEARS_PER_BLOCK,
    LLAMA_KINDS,
    NUM_BLOCKS,
    POLICIES,
    PRESETS,
    tiny_llama,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_peft import DepthSelector, LayerPolicy, Plan, PolicyError, PolicyWarning, Rule, inject_adapters
from lightning_peft.adapters.base import AdapterLinear


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in BUILDERS.items()}


def hybrid(outer: int = 1) -> LayerPolicy:
    data = yaml.safe_load(HYBRID.read_text())
    data["rules"][0]["depth"] = {"outer": outer}
    data["rules"][1]["depth"] = {"inner": outer}
    return LayerPolicy.from_dict(data)


def blocks_by_method(plan: Plan) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for row in plan.rows:
        out.setdefault(row.method, set()).add(row.block)
    return out


def expected_params(method: str, in_f: int, out_f: int, hp: dict) -> int:
    """Independent parameter formulas (DESIGN §5; MoRA reference rounding rule)."""
    r = hp.get("r", 8)
    if method in ("lora", "hira"):  # HiRA: A (r x in) and B (out x r), as LoRA
        return r * (in_f + out_f)
    if method == "dora":
        return r * (in_f + out_f) + out_f  # + magnitude vector
    assert method == "mora"
    r_hat = math.floor(math.sqrt((in_f + out_f) * r) + 0.5)
    if hp.get("mora_type", "auto") == "auto" and r < 128:  # auto -> rope, which needs an even side
        r_hat -= r_hat % 2
    return r_hat * r_hat


# -- real architectures ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_hybrid_preset_mora_outer_dora_inner(models, arch):
    plan = LayerPolicy.from_yaml(HYBRID).resolve(models[arch])
    assert plan.num_blocks == NUM_BLOCKS
    assert plan.blocks_path == BLOCK_PREFIX[arch]
    assert blocks_by_method(plan) == {"mora": {0, 5}, "dora": {1, 2, 3, 4}}
    assert len(plan.rows) == NUM_BLOCKS * LINEARS_PER_BLOCK[arch]
    assert len({r.name for r in plan.rows}) == len(plan.rows)
    for row in plan.rows:
        assert row.name.startswith(f"{BLOCK_PREFIX[arch]}.{row.block}.")
        assert row.params == expected_params(row.method, row.in_features, row.out_features, row.hparams)
    assert plan.trainable_params == sum(r.params for r in plan.rows)
    assert sum(plan.params_by_method().values()) == plan.trainable_params
    assert plan.model_params == sum(p.numel() for p in models[arch].parameters())


def test_hybrid_llama_budget_by_hand(models):
    # MoRA blocks 0,5 (r_hat from (in+out)*8, rounded, even): q,o 22^2, k,v 20^2, gate,up,down 28^2.
    mora = 2 * (2 * 22**2 + 2 * 20**2 + 3 * 28**2)
    # DoRA blocks 1-4: r*(in+out) + out; per block sum(in+out) = 512, sum(out) = 256.
    dora = 4 * (8 * 512 + 256)
    plan = LayerPolicy.from_yaml(HYBRID).resolve(models["llama"])
    assert plan.params_by_method() == {"mora": mora, "dora": dora}
    assert plan.trainable_params == 25648 == mora + dora


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_hybrid_outer_two(models, arch):
    plan = hybrid(outer=2).resolve(models[arch])
    assert blocks_by_method(plan) == {"mora": {0, 1, 4, 5}, "dora": {2, 3}}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_every_preset_resolves_and_injects(arch, preset):
    model = BUILDERS[arch]()
    policy = LayerPolicy.from_yaml(preset)
    plan = policy.resolve(model)
    assert plan.rows, preset
    assert {r.block for r in plan.rows} == set(range(NUM_BLOCKS))  # every preset covers every block
    for row in plan.rows:
        assert row.params == expected_params(row.method, row.in_features, row.out_features, row.hparams)
    inject_adapters(model, policy)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == plan.trainable_params == sum(r.params for r in plan.rows)
    assert all(".adapter." in n for n in trainable), [n for n in trainable if ".adapter." not in n]
    layers = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    assert len(layers) == len(plan.rows)


def test_gpt2_conv1d_shapes(models):
    plan = LayerPolicy.from_yaml(POLICIES / "lora_all.yaml").resolve(models["gpt2"])
    shapes = {r.kind: (r.layer_type, r.in_features, r.out_features) for r in plan.rows if r.block == 0}
    assert shapes == {
        "attn.c_attn": ("Conv1D", 32, 96),
        "attn.c_proj": ("Conv1D", 32, 32),
        "mlp.c_fc": ("Conv1D", 32, 128),
        "mlp.c_proj": ("Conv1D", 128, 32),
    }


def test_lora_qv_preset_names_per_architecture(models):
    kinds = {
        arch: sorted({r.kind for r in LayerPolicy.from_yaml(POLICIES / "lora_qv.yaml").resolve(m).rows})
        for arch, m in models.items()
    }
    assert kinds == {
        "llama": ["self_attn.q_proj", "self_attn.v_proj"],
        "bert": ["attention.self.query", "attention.self.value"],
        "gpt2": ["attn.c_attn"],
    }


# -- depth selectors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "n", "expected"),
    [
        ({"indices": [0, -1]}, 6, {0, 5}),
        ({"indices": [-6, 2]}, 6, {0, 2}),
        ({"indices": ["2:-2"]}, 6, {2, 3}),
        ({"indices": [":2", "-1:"]}, 6, {0, 1, 5}),
        ({"indices": ["1:4", 5]}, 6, {1, 2, 3, 5}),
        ({"indices": ["3"]}, 6, {3}),
        ({"fraction": [0.0, 0.25]}, 8, {0, 1}),
        ({"fraction": [0.5, 1.0]}, 6, {3, 4, 5}),
        ({"fraction": [0.9, 1.0]}, 3, {2}),  # hi == 1 always includes the last block
        ({"fraction": [0.0, 1.0]}, 1, {0}),
        ({"first": 2}, 6, {0, 1}),
        ({"last": 2}, 6, {4, 5}),
        ({"outer": 1}, 6, {0, 5}),
        ({"outer": 3}, 6, {0, 1, 2, 3, 4, 5}),
        ({"inner": 1}, 6, {1, 2, 3, 4}),
        ({"inner": 2}, 6, {2, 3}),
        ({"inner": 0}, 4, {0, 1, 2, 3}),
        ({"first": 6}, 6, set(range(6))),
    ],
)
def test_depth_selector_blocks(selector, n, expected):
    assert DepthSelector(**selector).blocks(n) == expected


@pytest.mark.parametrize(
    ("selector", "n", "match"),
    [
        ({"outer": 4}, 6, "outer=4 is out of range for a model with 6 blocks"),
        ({"inner": 3}, 6, "out of range"),
        ({"first": 7}, 6, "out of range"),
        ({"indices": [7]}, 6, "depth index 7 is out of range"),
        ({"indices": [-7]}, 6, "depth index -7 is out of range"),
        ({"indices": ["4:2"]}, 6, "selects no block"),
        ({"indices": ["0:9"]}, 6, "out of range"),
        ({"indices": ["a:b"]}, 6, "must be an int or 'start:stop'"),
        ({"first": 1}, 0, "no repeated blocks"),
    ],
)
def test_depth_selector_out_of_range(selector, n, match):
    with pytest.raises(PolicyError, match=re.escape(match)):
        DepthSelector(**selector).blocks(n)


def test_depth_indices_through_resolve(models):
    policy = LayerPolicy(rules=[Rule("lora", ["q_proj"], depth={"indices": [0, "2:4", -1]})])
    assert {r.block for r in policy.resolve(models["llama"]).rows} == {0, 2, 3, 5}
    policy = LayerPolicy(rules=[Rule("lora", ["query"], depth={"fraction": [0.5, 1.0]})])
    assert {r.block for r in policy.resolve(models["bert"]).rows} == {3, 4, 5}
    policy = LayerPolicy(rules=[Rule("lora", ["c_fc"], depth={"last": 2})])
    assert [r.name for r in policy.resolve(models["gpt2"]).rows] == [
        "transformer.h.4.mlp.c_fc",
        "transformer.h.5.mlp.c_fc",
    ]


def test_modules_outside_blocks_match_only_rules_without_depth(models):
    # lm_head has no depth: the depth rule cannot take it, the depth-free rule can.
    rules = [Rule("lora", ["lm_head", "q_proj"], depth={"first": 1}), Rule("lora", ["lm_head"])]
    with pytest.raises(PolicyError, match=r"rule 0 .*pattern 'lm_head' matches no module inside the rule's depth"):
        LayerPolicy(rules=rules).resolve(models["llama"])  # strict: a dead pattern in a rule is an error
    with pytest.warns(PolicyWarning, match="pattern 'lm_head' matches no module"):
        rows = {r.name: (r.block, r.rule) for r in LayerPolicy(rules=rules, strict=False).resolve(models["llama"]).rows}
    assert rows == {"model.layers.0.self_attn.q_proj": (0, 0), "lm_head": (None, 1)}


# -- rule order, none, full -------------------------------------------------------------------


def test_first_match_wins_none_before_lora(models):
    """A `none` rule listed first carves an exception out of a broader later rule."""
    policy = LayerPolicy(
        rules=[Rule("none", ["q_proj"], depth={"indices": [0]}), Rule("lora", ["q_proj"], hparams={"r": 2})]
    )
    plan = policy.resolve(models["llama"])
    assert [r.block for r in plan.rows] == [1, 2, 3, 4, 5]
    model = tiny_llama()
    inject_adapters(model, policy)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert isinstance(model.model.layers[1].self_attn.q_proj, AdapterLinear)


def test_first_match_wins_lora_before_none(models):
    """Reversed, the broad lora rule takes block 0 too, so the later `none` rule decides nothing:
    an error under `strict` (it is dead code), and with strict: false block 0 is adapted."""
    rules = [Rule("lora", ["q_proj"], hparams={"r": 2}), Rule("none", ["q_proj"], depth={"indices": [0]})]
    with pytest.raises(PolicyError, match=r"rule 1 .*matches no module \(the 1 module\(s\) it matches are taken"):
        LayerPolicy(rules=rules).resolve(models["llama"])
    plan = LayerPolicy(rules=rules, strict=False).resolve(models["llama"])
    assert [r.block for r in plan.rows] == [0, 1, 2, 3, 4, 5]
    assert {r.rule for r in plan.rows} == {0}


def test_first_match_wins_between_methods(models):
    policy = LayerPolicy(
        rules=[Rule("mora", ["self_attn.*"], depth={"first": 1}, hparams={"r": 4}), Rule("lora", ["*"])]
    )
    plan = policy.resolve(models["llama"])
    methods = {(r.block, r.kind): r.method for r in plan.rows}
    assert methods[(0, "self_attn.q_proj")] == "mora"
    assert methods[(0, "mlp.up_proj")] == "lora"
    assert methods[(1, "self_attn.q_proj")] == "lora"
    assert methods[(None, "lm_head")] == "lora"  # `*` without depth also reaches the head
    assert sum(m == "mora" for m in methods.values()) == 4


def test_full_trains_the_module_itself(models):
    policy = LayerPolicy(
        rules=[
            Rule("full", ["model.layers.0.mlp"]),
            Rule("full", ["embed_tokens"]),
            Rule("lora", ["*"], depth={"first": 1}),
        ]
    )
    model = tiny_llama()
    plan = inject_adapters(model, policy)
    mlp = model.model.layers[0].mlp
    full_rows = {r.name: r for r in plan.rows if r.method == "full"}
    assert full_rows["model.layers.0.mlp"].params == sum(p.numel() for p in mlp.parameters()) == 3 * 32 * 64
    assert full_rows["model.embed_tokens"].params == 64 * 32
    # the mlp subtree keeps its plain Linear layers (decided as a whole), all trainable
    assert all(type(m) is nn.Linear for m in mlp.children() if m._parameters)
    assert all(p.requires_grad for p in mlp.parameters())
    assert model.model.embed_tokens.weight.requires_grad
    # attention in block 0 got lora from the third rule; block 1 is untouched
    assert isinstance(model.model.layers[0].self_attn.q_proj, AdapterLinear)
    assert not any(p.requires_grad for p in model.model.layers[1].parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == plan.trainable_params == 3 * 32 * 64 + 64 * 32 + 8 * (64 + 48 + 48 + 64)


# -- name matching ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "expected_kinds"),
    [
        (["self_attn.*"], {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}),
        (["*_proj"], set(LLAMA_KINDS)),
        (["mlp.down_proj"], {"mlp.down_proj"}),
        (["[qv]_proj"], {"self_attn.q_proj", "self_attn.v_proj"}),
        (["re:.*\\.(q|v)_proj"], {"self_attn.q_proj", "self_attn.v_proj"}),
        (["re:(gate|up)_proj"], {"mlp.gate_proj", "mlp.up_proj"}),
        (["model.layers.*.mlp.gate_proj"], {"mlp.gate_proj"}),
    ],
)
def test_name_matching(models, patterns, expected_kinds):
    plan = LayerPolicy(rules=[Rule("lora", patterns, depth={"indices": ["0:6"]})]).resolve(models["llama"])
    assert {r.kind for r in plan.rows} == expected_kinds
    assert len(plan.rows) == NUM_BLOCKS * len(expected_kinds)


def test_qualified_name_selects_one_module(models):
    plan = LayerPolicy(rules=[Rule("lora", ["model.layers.3.mlp.up_proj"])]).resolve(models["llama"])
    assert [(r.name, r.block, r.kind) for r in plan.rows] == [("model.layers.3.mlp.up_proj", 3, "mlp.up_proj")]


def test_regex_is_fullmatch(models):
    with pytest.raises(PolicyError, match="matches no module"):
        LayerPolicy(rules=[Rule("lora", ["re:q"])]).resolve(models["llama"])
    with pytest.raises(PolicyError, match="matches no module"):  # globs are anchored too
        LayerPolicy(rules=[Rule("lora", ["proj"])]).resolve(models["llama"])


# -- blocks: discovery and override -----------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_block_discovery(models, arch):
    plan = LayerPolicy(rules=[Rule("lora", ["*"], depth={"first": 1})]).resolve(models[arch])
    assert (plan.blocks_path, plan.num_blocks) == (BLOCK_PREFIX[arch], NUM_BLOCKS)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)


class _TwoStacks(nn.Module):
    """An encoder stack of 4 blocks and a decoder stack of 6: discovery picks the longest."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(_Block() for _ in range(4))
        self.decoder = nn.ModuleList(_Block() for _ in range(6))
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(9))  # bare layers: never blocks


def test_blocks_override():
    model = _TwoStacks()
    rules = [Rule("lora", ["fc"], depth={"last": 1}, hparams={"r": 2})]
    auto = LayerPolicy(rules=rules).resolve(model)
    assert (auto.blocks_path, auto.num_blocks) == ("decoder", 6)
    assert [r.name for r in auto.rows] == ["decoder.5.fc"]
    forced = LayerPolicy(rules=rules, blocks="encoder").resolve(model)
    assert (forced.blocks_path, forced.num_blocks) == ("encoder", 4)
    assert [r.name for r in forced.rows] == ["encoder.3.fc"]


def test_blocks_override_on_llama(models):
    policy = LayerPolicy.from_dict({**yaml.safe_load(HYBRID.read_text()), "blocks": "model.layers"})
    assert policy.resolve(models["llama"]) == LayerPolicy.from_yaml(HYBRID).resolve(models["llama"])
    with pytest.raises(PolicyError, match=r"`blocks: model.nope` does not name a submodule"):
        LayerPolicy(rules=[Rule("lora", ["q_proj"])], blocks="model.nope").resolve(models["llama"])
    with pytest.raises(PolicyError, match="not a ModuleList/Sequential"):
        LayerPolicy(rules=[Rule("lora", ["q_proj"])], blocks="model.embed_tokens").resolve(models["llama"])


# -- serialisation and display ----------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_plan_json_round_trip(models, arch):
    plan = LayerPolicy.from_yaml(HYBRID).resolve(models[arch])
    assert Plan.from_dict(plan.to_dict()) == plan
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    assert again.trainable_params == plan.trainable_params


def test_policy_dict_round_trip_and_no_mutation():
    data = yaml.safe_load(HYBRID.read_text())
    snapshot = json.dumps(data, sort_keys=True)
    policy = LayerPolicy.from_dict(data)
    assert json.dumps(data, sort_keys=True) == snapshot  # the caller's mapping is left alone
    assert LayerPolicy.from_dict(policy.to_dict()) == policy
    assert LayerPolicy.from_dict(data) == policy


def test_rich_table_renders(models):
    from rich.console import Console

    plan = LayerPolicy.from_yaml(HYBRID).resolve(models["llama"])
    console = Console(record=True, width=200)
    console.print(plan.table())
    text = console.export_text()
    for kind in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        assert kind in text
    by_method = plan.params_by_method()
    assert re.search(rf"total mora\s.*\b{by_method['mora']:,}\b", text)
    assert re.search(rf"total dora\s.*\b{by_method['dora']:,}\b", text)
    assert re.search(rf"total trainable\s.*\b{plan.trainable_params:,}\b", text)
    assert f"{8 * (32 + 32) + 32:,}" in text  # one DoRA q_proj row: 544
    assert "25,648" in plan.summary()


# -- bad input --------------------------------------------------------------------------------


def _rule(**kw):
    base = {"name": "my-rule", "method": "lora", "modules": ["q_proj"]}
    base.update(kw)
    return {"rules": [base]}


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        (_rule(modules=["nothing_here"]), r"rule 0 \(my-rule\) matches no module"),
        (
            _rule(method="loar"),
            r"rule 0 \(my-rule\): Unknown adapter method 'loar'; choose one of \['dora', 'hira', 'lora', 'mora'\]",
        ),
        (
            _rule(hparams={"rnak": 8}),
            r"rule 0 \(my-rule\): Unknown hyper-parameter\(s\) \['rnak'\] for method 'lora'; valid: \['r'",
        ),
        (
            _rule(hparams={"r": "four"}),
            r"rule 0 \(my-rule\): hyper-parameter `r` of lora must be int, got the string 'four'",
        ),
        (_rule(hparams={"r": 0}), r"rule 0 \(my-rule\).*`r` must be a positive integer, got 0"),
        (
            _rule(depth={"outer": 4}),
            r"rule 0 \(my-rule\): depth selector outer=4 is out of range for a model with 6 blocks",
        ),
        (_rule(depth={"indices": [7]}), r"rule 0 \(my-rule\): depth index 7 is out of range for a model with 6 blocks"),
        (_rule(depth={"outer": 1, "inner": 1}), r"rule 0 \(my-rule\): A depth selector needs exactly one"),
        (_rule(depth={"fraction": [0.5, 0.2]}), r"rule 0 \(my-rule\): Depth selector `fraction` must be"),
        (_rule(depth={"first": 0}), r"rule 0 \(my-rule\): Depth selector `first` must be a positive integer"),
        (
            _rule(depth={"frist": 1}),
            r"rule 0 \(my-rule\): unknown depth selector key 'frist' \(did you mean 'first'\?\)",
        ),
        (_rule(mehtod="lora"), r"rule 0 \(my-rule\): unknown rule key 'mehtod' \(did you mean 'method'\?\)"),
        (
            _rule(modules=["embed_tokens"]),
            r"rule 0 \(my-rule\) targets only modules lora cannot adapt.*Embedding"
            r".*supported types are \['Linear', 'Conv1D'[^\]]*\]",
        ),
        (
            _rule(method="mora", hparams={"dropout": 1.5}),
            r"rule 0 \(my-rule\).*`dropout` must be a float in \[0, 1\), got 1.5",
        ),
        (_rule(method="dora", hparams={"eps": -1}), r"rule 0 \(my-rule\).*`eps` must be a positive number"),
        (_rule(method="lora", hparams={"alpha": 0}), r"rule 0 \(my-rule\).*`alpha` must be a positive number"),
        (_rule(method="mora", hparams={"mora_type": "bogus"}), r"rule 0 \(my-rule\).*Unknown `mora_type` 'bogus'"),
        (
            _rule(method="mora", hparams={"alpha": 16}),
            r"rule 0 \(my-rule\): Unknown hyper-parameter\(s\) \['alpha'\] for method 'mora'",
        ),
        (_rule(method="none", hparams={"r": 4}), r"rule 0 \(my-rule\): method 'none' takes no hyper-parameters"),
        (_rule(modules=["re:(q_proj"]), r"rule 0 \(my-rule\): bad regex"),
        (_rule(modules=[]), r"rule 0 \(my-rule\): `modules` is empty"),
        ({"rules": []}, r"`rules` is empty"),
        (
            {"rules": [{"method": "lora", "modules": ["q_proj"]}, {"method": "dora", "modules": ["q_proj"]}]},
            r"rule 1 \(dora on \['q_proj'\]\) has the same `modules` and `depth` as rule 0; it could never match",
        ),
        (
            {
                "rules": [
                    {"method": "lora", "modules": ["*"], "depth": {"inner": 1}},
                    {"method": "mora", "modules": ["*"], "depth": {"inner": 1}},
                ]
            },
            r"rule 1 .*same `modules` and `depth` as rule 0",
        ),
        (
            {"rules": [{"method": "lora", "modules": ["*_proj"]}, {"method": "dora", "modules": ["q_proj"]}]},
            r"rule 1 \(dora on \['q_proj'\]\) matches no module"
            r" \(the 6 module\(s\) it matches are taken by earlier rules\)",
        ),
        ({"rules": [{"method": "lora", "modules": ["q_proj"]}], "bogus": 1}, r"policy: unknown policy key 'bogus'"),
    ],
)
def test_bad_policies_raise_policy_error(models, policy, match):
    with pytest.raises(PolicyError, match=match) as info:
        LayerPolicy.from_dict(policy).resolve(models["llama"])
    assert isinstance(info.value, ValueError)


def test_full_on_embedding_is_fine(models):
    plan = LayerPolicy.from_dict(_rule(method="full", modules=["embed_tokens"])).resolve(models["llama"])
    assert [(r.name, r.method, r.layer_type, r.params) for r in plan.rows] == [
        ("model.embed_tokens", "full", "Embedding", 64 * 32)
    ]


def test_yaml_syntax_error_names_file(tmp_path):
    path = tmp_path / "broken_policy.yaml"
    path.write_text("rules:\n  - method: lora\n    modules: [q_proj\n")
    with pytest.raises(PolicyError, match=re.escape(str(path)) + ".*YAML syntax error"):
        LayerPolicy.from_yaml(path)


def test_yaml_schema_error_names_file_and_rule(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("rules:\n  - method: lora\n    modules: [q_proj]\n  - mehtod: dora\n    modules: [v_proj]\n")
    with pytest.raises(PolicyError, match=re.escape(str(path)) + r": rule 1 .*unknown rule key 'mehtod'"):
        LayerPolicy.from_yaml(path)


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        LayerPolicy.from_yaml(tmp_path / "nope.yaml")


def test_resolve_refuses_an_injected_model():
    model = tiny_llama()
    inject_adapters(model, LayerPolicy.from_yaml(HYBRID))
    with pytest.raises(PolicyError, match="already carries a mora adapter"):
        LayerPolicy.from_yaml(HYBRID).resolve(model)


def test_resolve_works_on_meta_and_is_pure():
    with torch.device("meta"):
        model = tiny_llama()
    before = [(n, type(m)) for n, m in model.named_modules()]
    plan = LayerPolicy.from_yaml(HYBRID).resolve(model)
    assert plan.trainable_params == 25648
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert all(p.requires_grad for p in model.parameters())


# -- property-based ---------------------------------------------------------------------------


@st.composite
def valid_selectors(draw):
    """A valid selector for n blocks and its expected block set, from first principles."""
    n = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["indices", "fraction", "first", "last", "outer", "inner"]))
    if kind == "indices":
        picks: set[int] = set()
        items: list = []
        for _ in range(draw(st.integers(1, 4))):
            if draw(st.booleans()):
                i = draw(st.integers(0, n - 1))
                picks.add(i)
                items.append(i - n if draw(st.booleans()) else i)
            else:
                a = draw(st.integers(0, n - 1))
                b = draw(st.integers(a + 1, n))
                picks |= set(range(a, b))
                sa = "" if a == 0 and draw(st.booleans()) else str(a - n if draw(st.booleans()) else a)
                sb = "" if b == n and draw(st.booleans()) else str(b - n if b < n and draw(st.booleans()) else b)
                items.append(f"{sa}:{sb}")
        return n, DepthSelector(indices=items), picks
    if kind == "fraction":
        lo = draw(st.floats(0.0, 0.99))
        hi = draw(st.floats(lo + 0.005, 1.0))
        expected = {i for i in range(n) if lo <= i / n < hi}
        if hi >= 1.0:
            expected.add(n - 1)
        return n, DepthSelector(fraction=[lo, hi]), expected
    if kind in ("first", "last"):
        k = draw(st.integers(1, n))
        return n, DepthSelector(**{kind: k}), set(range(k)) if kind == "first" else set(range(n - k, n))
    if kind == "outer":
        if n < 2:
            return n, DepthSelector(first=1), {0}
        k = draw(st.integers(1, n // 2))
        return n, DepthSelector(outer=k), set(range(k)) | set(range(n - k, n))
    k = draw(st.integers(0, (n - 1) // 2))
    return n, DepthSelector(inner=k), set(range(k, n - k))


@settings(max_examples=300, deadline=None)
@given(valid_selectors())
def test_property_valid_selectors(case):
    n, selector, expected = case
    got = selector.blocks(n)
    assert got <= set(range(n))
    assert got == expected


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 40),
    kind=st.sampled_from(["first", "last", "outer", "inner"]),
    k=st.integers(-3, 45),
    indices=st.lists(st.one_of(st.integers(-45, 45), st.text("0123456789-: x", max_size=6)), min_size=1, max_size=4),
)
def test_property_any_selector_subset_or_policy_error(n, kind, k, indices):
    for make in (lambda: DepthSelector(**{kind: k}), lambda: DepthSelector(indices=indices)):
        try:
            got = make().blocks(n)
        except PolicyError:
            continue
        assert got <= set(range(n))
        assert got


_LEAVES = ["q_proj", "k_proj", "v_proj", "fc1", "fc2", "norm", "drop"]
_PATTERNS = [
    "*",
    "q_proj",
    "*_proj",
    "fc?",
    "attn.*",
    "mlp.fc1",
    "blocks.1.*",
    "re:.*proj",
    "re:fc[12]",
    "head",
    "nothing",
    "emb",
]


class _RandomBlock(nn.Module):
    def __init__(self, attn: list[str], mlp: list[str]) -> None:
        super().__init__()
        self.attn, self.mlp = nn.Module(), nn.Module()
        for container, names in ((self.attn, attn), (self.mlp, mlp)):
            for name in names:
                layer = nn.LayerNorm(8) if name == "norm" else nn.Dropout() if name == "drop" else nn.Linear(8, 8)
                container.add_module(name, layer)


class _RandomModel(nn.Module):
    def __init__(self, n: int, attn: list[str], mlp: list[str]) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(_RandomBlock(attn, mlp) for _ in range(n))
        self.head = nn.Linear(8, 10)


def _reference_winner(rules: list[Rule], name: str, block: int | None, n: int) -> int | None:
    """First rule whose patterns match a dotted suffix of `name` and whose depth contains `block`."""
    suffixes = [".".join(name.split(".")[i:]) for i in range(len(name.split(".")))]
    for i, rule in enumerate(rules):
        hit = any(
            re.fullmatch(p[3:], s) if p.startswith("re:") else fnmatch.fnmatchcase(s, p)
            for p in rule.modules
            for s in suffixes
        )
        if not hit:
            continue
        if rule.depth is not None and (block is None or block not in rule.depth.blocks(n)):
            continue
        return i
    return None


@st.composite
def random_policies(draw):
    rules = []
    for _ in range(draw(st.integers(1, 3))):  # the empty policy has its own test
        rule = {
            "method": draw(st.sampled_from(["lora", "dora", "mora", "lora", "dora", "mora", "none", "full", "vera"])),
            "modules": draw(st.lists(st.sampled_from(_PATTERNS), min_size=1, max_size=3, unique=True)),
        }
        if draw(st.booleans()):
            rule["depth"] = draw(
                st.one_of(
                    st.fixed_dictionaries({"first": st.integers(1, 5)}),
                    st.fixed_dictionaries({"outer": st.integers(1, 3)}),
                    st.fixed_dictionaries({"inner": st.integers(0, 2)}),
                    st.fixed_dictionaries({"indices": st.lists(st.integers(-5, 5), min_size=1, max_size=2)}),
                    st.fixed_dictionaries({"fraction": st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted)}),
                )
            )
        if rule["method"] not in ("none", "full") and draw(st.booleans()):
            rule["hparams"] = {"r": draw(st.sampled_from([1, 2, 4, 1, 2, 4, 0, "x"]))}
        rules.append(rule)
    return {"rules": rules, "strict": draw(st.sampled_from([True, False, False]))}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 5),
    attn=st.lists(st.sampled_from(_LEAVES), min_size=1, max_size=3, unique=True),
    mlp=st.lists(st.sampled_from(_LEAVES), min_size=1, max_size=3, unique=True),
    data=random_policies(),
)
def test_property_resolve_only_raises_policy_error(n, attn, mlp, data):
    model = _RandomModel(n, attn, mlp)
    try:
        policy = LayerPolicy.from_dict(data)
        plan = policy.resolve(model)
    except PolicyError:
        return
    names = [r.name for r in plan.rows]
    assert len(names) == len(set(names))  # one method per module
    for a in names:  # and never a row inside another row's subtree
        assert not any(b.startswith(a + ".") for b in names)
    for row in plan.rows:
        assert row.rule == _reference_winner(policy.rules, row.name, row.block, plan.num_blocks)
        assert row.method == policy.rules[row.rule].method
        if row.method in ("lora", "dora", "mora"):
            assert row.params == expected_params(row.method, 8, row.out_features, row.hparams)
    assert plan.trainable_params == sum(r.params for r in plan.rows)
    assert Plan.from_dict(plan.to_dict()) == plan


def test_depth_range_with_a_bare_minus_is_a_policy_error():
    """Found by hypothesis: ':-' once passed the range pattern and crashed in int()."""
    with pytest.raises(PolicyError, match="depth index must be"):
        DepthSelector(indices=[":-"]).blocks(6)
