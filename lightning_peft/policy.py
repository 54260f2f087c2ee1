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
import fnmatch
import functools
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters.base import (
    AdapterLinear,
    check_hyperparameters,
    get_adapter_class,
    hyperparameter_names,
    is_supported_layer,
    layer_shape,
    supported_layer_types,
)
from .optim_groups import OptimSettings, as_optim_settings, check_rule_optim
from .schema import ConfigInputError, load_yaml, read_yaml_file, signature_types, type_error

SPECIAL_METHODS = ("none", "full")
PRESETS_PACKAGE = "lightning_peft.presets"  # package data: found by name from any directory, in any install
# Wrapper infixes that torch.compile / FSDP / checkpointing / DDP add to module names.
_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
# An adapter with more trainable parameters than this many times its layer's weight is an error
# (a rank many times the layer's size is a typo); above 1x it is a warning (`full` is cheaper).
MAX_ADAPTER_TO_LAYER_PARAMS = 4


class PolicyError(ValueError):
    """A policy that cannot be applied to a model; the message names the rule and module."""


class PolicyWarning(UserWarning):
    """A policy that works but probably not as meant: overlapping rules, oversized adapters, and
    (with `strict: false`) rules or patterns that match nothing."""


def check_fields(obj: Any) -> None:
    """Raise a `PolicyError` naming the first dataclass field whose value is not of its annotated type."""
    for name, annotation in _dataclass_types(type(obj)):
        error = type_error(getattr(obj, name), annotation)
        if error is not None:
            raise PolicyError(f"`{name}` {error}")


@functools.cache
def _dataclass_types(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = signature_types(cls)
    return tuple((f.name, hints.get(f.name, Any)) for f in dataclasses.fields(cls))


def check_unknown_keys(mapping: dict[str, Any], cls: type, what: str) -> None:
    """Raise naming a key of `mapping` that is not a field of dataclass `cls` (with a close match)."""
    valid = [name for name, _ in _dataclass_types(cls)]
    for key in mapping:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PolicyError(f"unknown {what} key {key!r}{hint}; valid keys: {valid}")


@dataclass
class DepthSelector:
    """Which blocks a rule applies to. Set exactly one field.

    Args:
        indices: block indices or `"start:stop"` ranges (Python slice rules; negatives count
            from the end), e.g. `[0, -1]` or `["2:-2"]`.
        fraction: `[lo, hi]` fractions of the depth; block `i` matches when
            `lo <= i / num_blocks < hi` (`hi == 1.0` includes the last block).
        first: the first k blocks.
        last: the last k blocks.
        outer: the first k and the last k blocks.
        inner: every block except the first k and the last k.
    """

    indices: list[int | str] | None = None
    fraction: list[float] | None = None
    first: int | None = None
    last: int | None = None
    outer: int | None = None
    inner: int | None = None

    def __post_init__(self) -> None:
        chosen = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        if len(chosen) != 1:
            raise PolicyError(
                f"A depth selector needs exactly one of indices/fraction/first/last/outer/inner, got {chosen}"
            )
        try:
            check_fields(self)
        except PolicyError as err:
            raise PolicyError(f"depth selector {err}") from None
        for name in ("first", "last", "outer", "inner"):
            k = getattr(self, name)
            if k is not None and k < (0 if name == "inner" else 1):
                raise PolicyError(f"Depth selector `{name}` must be a positive integer, got {k!r}")
        if self.fraction is not None:
            lo_hi = list(self.fraction)
            if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0:
                raise PolicyError(f"Depth selector `fraction` must be [lo, hi] with 0 <= lo < hi <= 1, got {lo_hi}")

    @classmethod
    def from_value(cls, value: Any) -> DepthSelector | None:
        """A selector from a mapping (unknown keys named), an existing selector, or `None`."""
        if isinstance(value, dict):
            check_unknown_keys(value, cls, "depth selector")
            return cls(**value)
        return value

    def describe(self) -> str:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                return f"{f.name}={value}"
        return "all"

    def blocks(self, num_blocks: int) -> set[int]:
        """The selected block indices; raises when the selector does not fit `num_blocks`."""
        n = num_blocks
        if n == 0:
            raise PolicyError(f"depth selector {self.describe()} used, but the model has no repeated blocks")
        if self.indices is not None:
            picked: set[int] = set()
            for item in self.indices:
                picked |= _parse_index(item, n)
            return picked
        if self.fraction is not None:
            lo, hi = self.fraction
            return {i for i in range(n) if lo <= i / n < hi or (hi >= 1.0 and i == n - 1)}
        k = next(v for v in (self.first, self.last, self.outer, self.inner) if v is not None)
        limit = n if self.outer is None and self.inner is None else n // 2 if self.outer is not None else (n - 1) // 2
        if k > limit:
            raise PolicyError(f"depth selector {self.describe()} is out of range for a model with {n} blocks")
        if self.first is not None:
            return set(range(k))
        if self.last is not None:
            return set(range(n - k, n))
        outer = set(range(k)) | set(range(n - k, n))
        return outer if self.outer is not None else set(range(n)) - outer


def _parse_index(item: int | str, n: int) -> set[int]:
    if isinstance(item, bool):
        raise PolicyError(f"depth index must be an int or 'start:stop', got {item!r}")
    if isinstance(item, int):
        if not -n <= item < n:
            raise PolicyError(f"depth index {item} is out of range for a model with {n} blocks")
        return {item % n}
    match = re.fullmatch(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*", item) if isinstance(item, str) else None
    if match:
        start = int(match.group(1)) if match.group(1) else 0
        stop = int(match.group(2)) if match.group(2) else n
        for bound in (start, stop):
            if not -n <= bound <= n:
                raise PolicyError(f"depth range {item!r} is out of range for a model with {n} blocks")
        picked = set(range(n)[slice(start, stop)])
        if not picked:
            raise PolicyError(f"depth range {item!r} selects no block of {n}")
        return picked
    if isinstance(item, str) and re.fullmatch(r"\s*-?\d+\s*", item):
        return _parse_index(int(item), n)
    raise PolicyError(f"depth index must be an int or 'start:stop', got {item!r}")


@dataclass
class Rule:
    """One policy rule: *where* (`modules`, `depth`) and *what* (`method`, `hparams`).

    Args:
        method: a registered adapter method, `none` (leave frozen) or `full` (train fully).
        modules: globs or `re:<regex>` patterns on module names (see the module docstring).
        depth: optional block selector.
        hparams: keyword arguments of the method, e.g. `{r: 8, alpha: 16}`.
        name: label used in plans and error messages (defaults to `rule <index>`).
        optim: per-rule optimizer settings (`lr` or `lr_scale`, `weight_decay`,
            `lora_plus_ratio`), applied as param groups at fit start (`optim_groups.py`).
    """

    method: str
    modules: list[str] = field(default_factory=lambda: ["*"])
    depth: DepthSelector | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    optim: OptimSettings | None = None

    def __post_init__(self) -> None:
        if isinstance(self.modules, str | tuple):
            self.modules = [self.modules] if isinstance(self.modules, str) else list(self.modules)
        self.depth = DepthSelector.from_value(self.depth)
        self.hparams = {} if self.hparams is None else self.hparams
        self.optim = as_optim_settings(self.optim)
        check_fields(self)
        self.hparams = dict(self.hparams)
        if not self.modules:
            raise PolicyError("`modules` is empty")
        for pattern in self.modules:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise PolicyError(f"bad regex {pattern!r}: {err}") from None
        check_method_hparams(self.method, self.hparams)
        check_rule_optim(self.method, self.optim)

    @classmethod
    def from_value(cls, value: Any) -> Rule:
        """A rule from a mapping (unknown keys named) or an existing `Rule`."""
        if isinstance(value, Rule):
            return value
        if not isinstance(value, dict):
            raise PolicyError(f"must be a Rule or a mapping, got {type(value).__name__}")
        check_unknown_keys(value, cls, "rule")
        if "method" not in value:
            raise PolicyError("`method` is missing (lora, dora, mora, ..., none or full)")
        return cls(**value)

    def label(self, index: int) -> str:
        return f"rule {index} ({self.name})" if self.name else f"rule {index} ({self.method} on {self.modules})"

    def matches_name(self, name: str) -> bool:
        return any(pattern_matches(p, name) for p in self.modules)


def check_method_hparams(method: str, hparams: dict[str, Any]) -> None:
    """Raise a `PolicyError` for an unknown method, an unknown hyper-parameter, or a value whose
    type is not the one the method's `__init__` annotates (no coercion, floats finite)."""
    if method in SPECIAL_METHODS:
        if hparams:
            raise PolicyError(f"method {method!r} takes no hyper-parameters, got {sorted(hparams)}")
        return
    try:
        cls = get_adapter_class(method)
    except ValueError as err:
        raise PolicyError(f"{err} (or 'none'/'full')") from None
    if not set(hparams) <= _hparam_names(cls):
        try:
            check_hyperparameters(method, hparams)  # raises, naming the unknown ones and the valid ones
        except ValueError as err:
            raise PolicyError(str(err)) from None
    types = _init_types(cls)
    for key, value in hparams.items():
        error = type_error(value, types.get(key, Any))
        if error is not None:
            raise PolicyError(f"hyper-parameter `{key}` of {method} {error}")


@functools.cache
def _hparam_names(cls: type) -> frozenset[str]:
    return frozenset(hyperparameter_names(cls))


@functools.cache
def _init_types(cls: type) -> dict[str, Any]:
    return signature_types(cls.__init__)


def _name_suffixes(name: str) -> Iterator[str]:
    parts = name.split(".")
    for i in range(len(parts)):
        yield ".".join(parts[i:])


def pattern_matches(pattern: str, name: str) -> bool:
    """Policy name matching: a glob (or `re:<regex>`) against the name or any dotted suffix of it."""
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return any(regex.fullmatch(s) for s in _name_suffixes(name))
    return any(fnmatch.fnmatchcase(s, pattern) for s in _name_suffixes(name))


def normalise_name(name: str) -> str:
    """Drop wrapper infixes (`_orig_mod`, `_fsdp_wrapped_module`, ...) from a module name."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


@dataclass
class PlanRow:
    """One targeted module: where it is, what it gets, what that costs."""

    name: str
    block: int | None
    kind: str
    layer_type: str
    in_features: int
    out_features: int
    method: str
    hparams: dict[str, Any]
    params: int
    rule: int
    optim: dict[str, float] = field(default_factory=dict)  # the rule's optimizer settings (may be absent)


@dataclass
class Plan:
    """The resolved policy for one model: a table with one row per targeted module."""

    rows: list[PlanRow]
    blocks_path: str | None
    num_blocks: int
    model_params: int

    @property
    def trainable_params(self) -> int:
        return sum(r.params for r in self.rows)

    def params_by_method(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.method] = out.get(r.method, 0) + r.params
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        rows = [PlanRow(**r) for r in data["rows"]]
        return cls(
            rows=rows, blocks_path=data["blocks_path"], num_blocks=data["num_blocks"], model_params=data["model_params"]
        )

    def fingerprint(self) -> list[tuple[str, str, str]]:
        """What must agree between a checkpoint and a live model: (module, method, hparams)."""
        return [(r.name, r.method, json.dumps(r.hparams, sort_keys=True)) for r in self.rows]

    def table(self, title: str = "lightning-peft plan"):
        """A rich `Table`: one row per module, then the budget per method."""
        from rich.table import Table

        table = Table(title=title, show_lines=False)
        optim_col = any(r.optim for r in self.rows)
        columns = ("block", "module", "method", "hyper-parameters", "params", "% of model")
        columns = (*columns[:4], "optimizer", *columns[4:]) if optim_col else columns
        for col in columns:
            table.add_column(
                col, justify="right" if col in ("block", "params", "% of model") else "left", overflow="fold"
            )
        for r in self.rows:
            hp = ", ".join(f"{k}={v}" for k, v in sorted(r.hparams.items()))
            optim = [OptimSettings(**r.optim).describe() or "-"] if optim_col else []
            table.add_row(
                "-" if r.block is None else str(r.block),
                r.kind,
                r.method,
                hp,
                *optim,
                f"{r.params:,}",
                f"{100 * r.params / max(self.model_params, 1):.3f}",
            )
        table.add_section()
        pad = [""] if optim_col else []
        for method, params in sorted(self.params_by_method().items()):
            share = f"{100 * params / max(self.model_params, 1):.3f}"
            table.add_row("", f"total {method}", method, "", *pad, f"{params:,}", share)
        table.add_row(
            "",
            "total trainable",
            "",
            "",
            *pad,
            f"{self.trainable_params:,}",
            f"{100 * self.trainable_params / max(self.model_params, 1):.3f}",
        )
        return table

    def summary(self) -> str:
        """A one-paragraph plain-text summary (for logs without rich)."""
        parts = [f"{m}: {p:,}" for m, p in sorted(self.params_by_method().items())]
        return (
            f"{len(self.rows)} modules adapted over {self.num_blocks} blocks ({self.blocks_path}); "
            f"trainable {self.trainable_params:,} of {self.model_params:,} "
            f"({100 * self.trainable_params / max(self.model_params, 1):.3f}%): " + ", ".join(parts)
        )


def list_presets() -> list[str]:
    """Names of the policy presets shipped inside the package (`lightning_peft/presets/*.yaml`)."""
    from importlib.resources import files

    return sorted(p.name[: -len(".yaml")] for p in files(PRESETS_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str | None:
    """The YAML text of preset `name`, or `None` when no preset has that name."""
    from importlib.resources import files

    if name not in list_presets():
        return None
    return (files(PRESETS_PACKAGE) / f"{name}.yaml").read_text()


def discover_blocks(model: nn.Module, path: str | None = None) -> tuple[str | None, int]:
    """The container of repeated blocks that defines depth, and how many blocks it holds.

    Auto-discovery picks the longest `ModuleList`/`Sequential` whose children all share one
    class (HF `model.layers`, BERT `encoder.layer`, GPT-2 `transformer.h`); `path` overrides.
    """
    if path is not None:
        try:
            container = model.get_submodule(path)
        except AttributeError as err:
            raise PolicyError(f"`blocks: {path}` does not name a submodule of {type(model).__name__}") from err
        if not isinstance(container, nn.ModuleList | nn.Sequential):
            raise PolicyError(f"`blocks: {path}` is a {type(container).__name__}, not a ModuleList/Sequential")
        return path, len(container)
    best: tuple[str | None, int] = (None, 0)
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear) or not isinstance(module, nn.ModuleList | nn.Sequential):
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        if is_supported_layer(children[0]) or not any(True for _ in children[0].children()):
            continue  # a list of bare layers (e.g. MoE experts) is not a stack of blocks
        if len(children) > best[1]:
            best = (normalise_name(name), len(children))
    return best


def _block_of(name: str, blocks_path: str | None) -> tuple[int | None, str]:
    """(block index, name inside the block) for a normalised module name."""
    if blocks_path is not None and name.startswith(blocks_path + "."):
        rest = name[len(blocks_path) + 1 :]
        index, _, inner = rest.partition(".")
        if index.isdigit():
            return int(index), inner or name
    return None, name


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


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
        import yaml

        path = Path(path)
        text = None if path.is_file() else preset_text(str(path))  # a preset name such as `mora_outer_dora_inner`
        source = f"preset {str(path)!r}" if text is not None else str(path)
        if text is None and not path.is_file():
            hint = f"; the preset {path.stem!r} is named without a path" if path.stem in list_presets() else ""
            raise PolicyError(f"Policy file {str(path)!r} does not exist (presets: {list_presets()}){hint}")
        try:
            data = read_yaml_file(path) if text is None else load_yaml(text)
        except ConfigInputError as err:
            raise PolicyError(f"{source}: {err}") from None
        except yaml.YAMLError as err:
            raise PolicyError(f"{source}: YAML syntax error: {err}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_text(cls, text: str, source: str = "policy") -> LayerPolicy:
        """A policy from YAML text (e.g. `--adapters.policy '{rules: [...]}'`), read as written."""
        import yaml

        try:
            data = load_yaml(text)
        except ConfigInputError as err:
            raise PolicyError(f"{source}: {err}") from None
        except yaml.YAMLError as err:
            raise PolicyError(f"{source}: YAML syntax error: {err}") from None
        return cls.from_dict(data, source=source)

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
        """First match wins; a later rule that also matched is told, once per pair of rules."""
        pairs: dict[tuple[int, int], list[str]] = {}
        for match in matches:
            if self._decides(match):
                for other in match.rules[1:]:
                    pairs.setdefault((match.rules[0], other), []).append(match.name)
        for (winner, other), names in pairs.items():
            warnings.warn(
                f"{self.rules[other].label(other)} also matches {len(names)} module(s) that "
                f"{self.rules[winner].label(winner)} decides (first match wins), e.g. {names[0]!r}",
                PolicyWarning,
                stacklevel=3,
            )


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


def _has_children(module: nn.Module) -> bool:
    return any(True for _ in module.children())
