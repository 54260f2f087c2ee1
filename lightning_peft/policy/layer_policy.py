"""Per-layer policies: which adapter method each module of a model gets.

A `LayerPolicy` is an ordered list of `Rule`s; for every module the **first** rule whose
`where` matches decides (docs/policies.md). `resolve(model)` is pure and cheap (it
reads module names and shapes only, so it works on the `meta` device) and returns a
`Plan`: one row per targeted module. Every problem a policy can have is raised here,
naming the rule, before anything is injected or trained.

Where a rule matches:
- `modules`: shell globs (or `re:<regex>`) tried against the qualified module name and every
  dotted suffix of it, so `q_proj`, `self_attn.*` and `model.layers.*.mlp.down_proj` all work.
- `depth`: a `DepthSelector` over the index of the repeated block the module sits in.
  Modules outside the blocks (embeddings, heads) have no depth and never match a rule with
  a depth selector.

What a rule does: `method` is a registered adapter (`lora`, `dora`, `mora`, ...) with
`hparams`, or `none` (leave frozen; use it to carve exceptions, it wins by order like any
rule) or `full` (train that module's own weights: the per-layer full fine-tuning baseline).

Values are checked against the annotations of these dataclasses and of each method's
`__init__`, exactly (no coercion: `r: "8"` is an error, `alpha: .nan` too), so a policy
written in Python, a mapping and a YAML file are held to the same rules.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.base import (
    AdapterLinear,
    get_adapter_class,
    is_supported_layer,
    layer_shape,
    supported_layer_types,
)
from lightning_peft.policy.errors import PolicyError, PolicyWarning, check_fields, check_unknown_keys
from lightning_peft.policy.matching import (
    _block_of,
    _has_children,
    _owns_parameters,
    discover_blocks,
    normalise_name,
    pattern_matches,
)
from lightning_peft.policy.plan import Plan, PlanRow
from lightning_peft.policy.presets import list_presets, preset_text
from lightning_peft.policy.rules import SPECIAL_METHODS, Rule
from lightning_peft.policy.schema import ConfigInputError, load_yaml, read_yaml_file

# An adapter with more trainable parameters than this many times its layer's weight is an error
# (a rank many times the layer's size is a typo); above 1x it is a warning (`full` is cheaper).
MAX_ADAPTER_TO_LAYER_PARAMS = 4


@dataclass
class _Match:
    """A module some rule matches: `rules` lists every matching rule in order; the first decides."""

    name: str
    module: nn.Module
    block: int | None
    kind: str
    rules: list[int]


@dataclass
class LayerPolicy:
    """An ordered list of rules (first match wins) plus optional overrides.

    Args:
        rules: the rules, tried in order for every module.
        blocks: dotted path of the repeated-block container; auto-discovered when `None`.
        strict: every rule, and every pattern in a rule's `modules`, must match at least one
            module (a rule that matches nothing, or only modules earlier rules already took, is
            an error rather than a silent no-op). With `strict: false` they are warnings
            (`PolicyWarning`), for policies shared across architectures. Either way a policy
            that adapts no module at all is an error.
    """

    rules: list[Rule] = field(default_factory=list)
    blocks: str | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.rules, list | tuple):
            raise PolicyError(f"`rules` must be a list of rules, got {type(self.rules).__name__}")
        if not self.rules:
            raise PolicyError("A policy needs at least one rule; `rules` is empty")
        rules = []
        for i, raw in enumerate(self.rules):
            try:
                rules.append(Rule.from_value(raw))
            except PolicyError as err:
                raise PolicyError(f"{_raw_label(raw, i)}: {err}") from None
        self.rules = rules
        check_fields(self)
        self._check_duplicate_rules()

    def _check_duplicate_rules(self) -> None:
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            key = repr((rule.modules, rule.depth))  # dataclass reprs: cheap and exact
            if key in seen:
                raise PolicyError(
                    f"{rule.label(i)} has the same `modules` and `depth` as rule {seen[key]}; it could never match"
                )
            seen[key] = i

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "policy") -> LayerPolicy:
        """Build from a plain mapping (YAML's schema); errors name `source` and the rule.

        Linear in the number of rules: each rule is checked once against the dataclass
        annotations and its method's signature (no deep copies, no coercion).
        """
        try:
            if not isinstance(data, dict):
                raise PolicyError(f"a policy must be a mapping with `rules`, got {type(data).__name__}")
            check_unknown_keys(data, cls, "policy")
            return cls(**data)
        except PolicyError as err:
            raise PolicyError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> LayerPolicy:
        """Load a policy file, read as written (YAML 1.2 scalars, no duplicate keys); errors name the file."""
        path = Path(path)
        text = None if path.is_file() else preset_text(str(path))  # a preset name such as `mora_outer_dora_inner`
        source = f"preset {str(path)!r}" if text is not None else str(path)
        if text is None and not path.is_file():
            hint = f"; the preset {path.stem!r} is named without a path" if path.stem in list_presets() else ""
            raise PolicyError(f"Policy file {str(path)!r} does not exist (presets: {list_presets()}){hint}")
        return cls.from_dict(
            _read_yaml(source, lambda: read_yaml_file(path) if text is None else load_yaml(text)), source
        )

    @classmethod
    def from_text(cls, text: str, source: str = "policy") -> LayerPolicy:
        """A policy from YAML text (e.g. `--adapters.policy '{rules: [...]}'`), read as written."""
        return cls.from_dict(_read_yaml(source, lambda: load_yaml(text)), source=source)

    @classmethod
    def load(cls, policy: LayerPolicy | str | Path | dict[str, Any]) -> LayerPolicy:
        """A policy from a `LayerPolicy`, a mapping, a YAML path or a preset name."""
        if isinstance(policy, LayerPolicy):
            return policy
        if isinstance(policy, dict):
            return cls.from_dict(policy)
        if isinstance(policy, str) and _looks_inline(policy):
            return cls.from_text(policy, source="inline policy")
        if isinstance(policy, str | Path):
            return cls.from_yaml(policy)
        raise PolicyError(f"A policy is a LayerPolicy, a mapping or a YAML path, got {type(policy).__name__}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for rule in data["rules"]:
            if rule["depth"] is not None:
                rule["depth"] = {k: v for k, v in rule["depth"].items() if v is not None}
            if rule.get("optim") is not None:
                rule["optim"] = {k: v for k, v in rule["optim"].items() if v is not None}
            else:
                rule.pop("optim", None)
        return data

    # -- resolution: plain steps, top to bottom --------------------------------------------

    def resolve(self, model: nn.Module) -> Plan:
        """Decide every module's method. Pure: reads names and shapes only (meta-safe).

        Every check runs before a plan is returned, so nothing is injected from a policy
        that does not fit: rules that match nothing, patterns that match nothing next to
        ones that do, depth selectors out of range, unadaptable targets, bad shapes.
        """
        blocks_path, num_blocks = discover_blocks(model, self.blocks)
        selected = self._selected_blocks(num_blocks)
        matches, pattern_hits = self._match_modules(model, blocks_path, selected)
        rows, unsupported = self._plan_rows(matches)
        self._check_every_rule_decides(matches, unsupported)
        self._check_every_pattern_matches(pattern_hits, model, blocks_path)
        self._warn_overlaps(matches)
        if not rows:
            raise PolicyError(
                f"The policy adapts no module of {type(model).__name__}: nothing would train "
                "(every match is `none`, or nothing matches); check `modules`/`depth`"
            )
        model_params = sum(p.numel() for p in model.parameters())
        return Plan(rows=rows, blocks_path=blocks_path, num_blocks=num_blocks, model_params=model_params)

    def _selected_blocks(self, num_blocks: int) -> list[set[int] | None]:
        """Each rule's block set (`None`: no depth selector)."""
        selected: list[set[int] | None] = []
        for i, rule in enumerate(self.rules):
            try:
                selected.append(None if rule.depth is None else rule.depth.blocks(num_blocks))
            except PolicyError as err:
                raise PolicyError(f"{rule.label(i)}: {err}") from None
        return selected

    def _match_modules(
        self, model: nn.Module, blocks_path: str | None, selected: list[set[int] | None]
    ) -> tuple[list[_Match], list[set[str]]]:
        """Every module some rule matches (children of a decided module are skipped), and the
        patterns of each rule that matched at least one module inside its depth."""
        matches: list[_Match] = []
        hits: list[set[str]] = [set() for _ in self.rules]
        decided_prefix: str | None = None  # named_modules is pre-order: a subtree is contiguous
        for raw_name, module in model.named_modules():
            name = normalise_name(raw_name)
            if not raw_name or (decided_prefix is not None and name.startswith(decided_prefix)):
                continue
            if isinstance(module, AdapterLinear):
                raise PolicyError(
                    f"Module {name!r} already carries a {module.method} adapter; remove it before resolving"
                )
            block, kind = _block_of(name, blocks_path)
            matching = []
            for i, rule in enumerate(self.rules):
                if selected[i] is not None and (block is None or block not in selected[i]):
                    continue
                hit = [p for p in rule.modules if pattern_matches(p, name)]
                if hit:
                    hits[i].update(hit)
                    matching.append(i)
            if matching:
                match = _Match(name, module, block, kind, matching)
                matches.append(match)
                if self._decides(match):
                    decided_prefix = name + "."
        return matches, hits

    def _decides(self, match: _Match) -> bool:
        """Whether the winning rule takes this module (and so its whole subtree)."""
        method = self.rules[match.rules[0]].method
        if method == "none":
            return True
        if method == "full":
            return any(True for _ in match.module.parameters())
        return is_supported_layer(match.module)

    def _plan_rows(self, matches: list[_Match]) -> tuple[list[PlanRow], list[list[str]]]:
        """One row per decided module; per rule, the parameter-owning leaves it cannot adapt."""
        rows: list[PlanRow] = []
        unsupported: list[list[str]] = [[] for _ in self.rules]
        sizes: dict[tuple, int] = {}  # (method, hparams, in, out) -> trainable parameters
        for match in matches:
            winner = match.rules[0]
            rule, module = self.rules[winner], match.module
            if rule.method == "none" or not self._decides(match):
                if rule.method not in SPECIAL_METHODS and _owns_parameters(module) and not _has_children(module):
                    unsupported[winner].append(f"{match.name} ({type(module).__name__})")
                continue
            if rule.method == "full":
                in_f, out_f = layer_shape(module) if is_supported_layer(module) else (0, 0)
                params = sum(p.numel() for p in module.parameters())
            else:
                in_f, out_f = layer_shape(module)
                key = (rule.method, json.dumps(rule.hparams, sort_keys=True, default=repr), in_f, out_f)
                if key not in sizes:
                    sizes[key] = self._adapter_params(winner, match.name, in_f, out_f)
                params = sizes[key]
            rows.append(
                PlanRow(
                    match.name,
                    match.block,
                    match.kind,
                    type(module).__name__,
                    in_f,
                    out_f,
                    rule.method,
                    dict(rule.hparams),
                    params,
                    winner,
                    rule.optim.to_dict() if rule.optim else {},  # travels with the plan: table, JSON, checkpoints
                )
            )
        return rows, unsupported

    def _adapter_params(self, index: int, name: str, in_f: int, out_f: int) -> int:
        """Build the adapter on `meta` (every hyper-parameter check, no memory), count its
        trainable parameters, and check its size against the layer's."""
        rule = self.rules[index]
        where = f"{rule.label(index)} on {name!r} ({in_f}->{out_f})"
        try:
            with torch.device("meta"):
                adapter = get_adapter_class(rule.method)(in_f, out_f, **rule.hparams)
        except (ValueError, TypeError, RuntimeError, OverflowError) as err:  # torch refuses absurd sizes too
            raise PolicyError(f"{where}: {err}") from None
        params = adapter.num_trainable_parameters()
        if params > MAX_ADAPTER_TO_LAYER_PARAMS * in_f * out_f:
            raise PolicyError(
                f"{where}: {rule.method} with {rule.hparams} has {params:,} trainable parameters, more than "
                f"{MAX_ADAPTER_TO_LAYER_PARAMS}x the layer's {in_f * out_f:,} weights; lower `r` (or use 'full')"
            )
        if params > in_f * out_f:
            warnings.warn(
                f"{where}: the {rule.method} adapter has {params:,} trainable parameters, more than the "
                f"layer's {in_f * out_f:,} weights (method 'full' would be cheaper)",
                PolicyWarning,
                stacklevel=4,
            )
        return params

    def _check_every_rule_decides(self, matches: list[_Match], unsupported: list[list[str]]) -> None:
        decided = [0] * len(self.rules)
        shadowed = [0] * len(self.rules)
        for match in matches:
            if self._decides(match):
                decided[match.rules[0]] += 1
                for other in match.rules[1:]:
                    shadowed[other] += 1
        for i, rule in enumerate(self.rules):
            if unsupported[i] and decided[i] == 0:
                names = [t.__name__ for t in supported_layer_types()]
                raise PolicyError(
                    f"{rule.label(i)} targets only modules {rule.method} cannot adapt: {unsupported[i][:5]}; "
                    f"supported types are {names} (use method 'full' to train such modules)"
                )
            if decided[i] == 0:
                why = f" (the {shadowed[i]} module(s) it matches are taken by earlier rules)" if shadowed[i] else ""
                self._strict_or_warn(f"{rule.label(i)} matches no module{why}; check `modules`/`depth`")

    def _check_every_pattern_matches(self, hits: list[set[str]], model: nn.Module, blocks_path: str | None) -> None:
        """A misspelled pattern next to a matching one must not leave half a rule silently unused."""
        for i, rule in enumerate(self.rules):
            dead = [p for p in rule.modules if p not in hits[i]]
            if not dead or not hits[i]:
                continue  # a rule matching nothing at all is reported by _check_every_rule_decides
            self._strict_or_warn(
                f"{rule.label(i)}: pattern {dead[0]!r} matches no module{_why_unmatched(dead[0], model, blocks_path)} "
                "while its other patterns do" + (f" (also unmatched: {dead[1:]})" if len(dead) > 1 else "")
            )

    def _strict_or_warn(self, message: str) -> None:
        if self.strict:
            raise PolicyError(f"{message}; or set strict: false")
        warnings.warn(f"{message} (ignored: strict is false)", PolicyWarning, stacklevel=4)

    def _warn_overlaps(self, matches: list[_Match]) -> None:
        """First match wins; a later rule that also matched is told, once per pair of rules.

        Not when the first is a `none` rule: a carve-out placed before the broad rule it
        overrides is the idiom the docs teach (`none: [o_proj]`, then `lora: ["*"]`)."""
        pairs: dict[tuple[int, int], list[str]] = {}
        for match in matches:
            if self._decides(match) and self.rules[match.rules[0]].method != "none":
                for other in match.rules[1:]:
                    pairs.setdefault((match.rules[0], other), []).append(match.name)
        for (winner, other), names in pairs.items():
            warnings.warn(
                f"{self.rules[other].label(other)} also matches {len(names)} module(s) that "
                f"{self.rules[winner].label(winner)} decides (first match wins), e.g. {names[0]!r}",
                PolicyWarning,
                stacklevel=3,
            )


def _read_yaml(source: str, read: Callable[[], Any]) -> Any:
    """`read()`'s YAML, with every reading error a `PolicyError` naming `source` (the file, preset or text)."""
    import yaml

    try:
        return read()
    except ConfigInputError as err:
        raise PolicyError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise PolicyError(f"{source}: YAML syntax error: {err}") from None


def _why_unmatched(pattern: str, model: nn.Module, blocks_path: str | None) -> str:
    """A hint for a dead pattern: it matches only outside the rule's depth, or a close name."""
    all_names = [normalise_name(n) for n, _ in model.named_modules() if n]
    outside = next((n for n in all_names if pattern_matches(pattern, n)), None)
    if outside is not None:
        return f" inside the rule's depth selector (it matches {outside!r}, outside it)"
    names = sorted({_block_of(n, blocks_path)[1] for n in all_names} | {n.rpartition(".")[2] for n in all_names})
    close = difflib.get_close_matches(pattern, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _looks_inline(text: str) -> bool:
    """A YAML mapping given in place of a path (the CLI passes `--adapters.policy '{rules: ...}'` as text)."""
    stripped = text.strip()
    return stripped.startswith("{") or "\n" in stripped or stripped.startswith("rules:")


def _raw_label(raw: Any, index: int) -> str:
    if isinstance(raw, Rule):
        return raw.label(index)
    if isinstance(raw, dict) and isinstance(raw.get("name"), str) and raw["name"]:
        return f"rule {index} ({raw['name']})"
    if isinstance(raw, dict):
        return f"rule {index} ({raw.get('method')} on {raw.get('modules', ['*'])})"
    return f"rule {index}"
