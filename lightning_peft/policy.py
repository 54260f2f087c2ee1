"""Per-layer policies: which adapter method each module of a model gets.

A `LayerPolicy` is an ordered list of `Rule`s; for every module the **first** rule whose
`where` matches decides (DESIGN §4). `resolve(model)` is pure and cheap (it reads module
names and shapes only, so it works on the `meta` device) and returns a `Plan`: one row per
targeted module. Every problem a policy can have is raised here, naming the rule, before
anything is injected or trained.

Where a rule matches:
- `modules`: shell globs (or `re:<regex>`) tried against the qualified module name and every
  dotted suffix of it, so `q_proj`, `self_attn.*` and `model.layers.*.mlp.down_proj` all work.
- `depth`: a `DepthSelector` over the index of the repeated block the module sits in.
  Modules outside the blocks (embeddings, heads) have no depth and never match a rule with
  a depth selector.

What a rule does: `method` is a registered adapter (`lora`, `dora`, `mora`, ...) with
`hparams`, or `none` (leave frozen; use it to carve exceptions, it wins by order like any
rule) or `full` (train that module's own weights: the per-layer full fine-tuning baseline).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import json
import re
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
    is_supported_layer,
    layer_shape,
    supported_layer_types,
)
from .optim_groups import OptimSettings, as_optim_settings, check_rule_optim

SPECIAL_METHODS = ("none", "full")
PRESETS_DIR = Path(__file__).resolve().parent.parent / "policies"
# Wrapper infixes that torch.compile / FSDP / checkpointing / DDP add to module names.
_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


class PolicyError(ValueError):
    """A policy that cannot be applied to a model; the message names the rule and module."""


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
        for name in ("first", "last", "outer", "inner"):
            k = getattr(self, name)
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < (0 if name == "inner" else 1)):
                raise PolicyError(f"Depth selector `{name}` must be a positive integer, got {k!r}")
        if self.fraction is not None:
            lo_hi = list(self.fraction)
            if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0:
                raise PolicyError(f"Depth selector `fraction` must be [lo, hi] with 0 <= lo < hi <= 1, got {lo_hi}")

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
        if isinstance(self.modules, str):
            self.modules = [self.modules]
        if isinstance(self.depth, dict):
            self.depth = DepthSelector(**self.depth)
        self.hparams = dict(self.hparams or {})
        self.optim = as_optim_settings(self.optim)

    def label(self, index: int) -> str:
        return f"rule {index} ({self.name})" if self.name else f"rule {index} ({self.method} on {self.modules})"

    def matches_name(self, name: str) -> bool:
        return any(pattern_matches(p, name) for p in self.modules)


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
    optim: dict[str, float] = field(default_factory=dict)


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
    """Names of the policy presets shipped in `policies/`."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


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


def _method_errors(rule: Rule, label: str) -> None:
    if rule.method in SPECIAL_METHODS:
        if rule.hparams:
            raise PolicyError(f"{label}: method {rule.method!r} takes no hyper-parameters, got {sorted(rule.hparams)}")
        return
    try:
        check_hyperparameters(rule.method, rule.hparams)
    except ValueError as err:
        raise PolicyError(f"{label}: {err}") from None


def _check_rule_mappings(rules: Any, source: str) -> None:
    """Unknown keys and bad depth selectors in raw rule mappings, reported with the rule's index."""
    if not isinstance(rules, list):
        return
    rule_keys = [f.name for f in dataclasses.fields(Rule)]
    depth_keys = [f.name for f in dataclasses.fields(DepthSelector)]
    for i, raw in enumerate(rules):
        if not isinstance(raw, dict):
            continue
        label = (
            f"rule {i} ({raw['name']})"
            if raw.get("name")
            else f"rule {i} ({raw.get('method')} on {raw.get('modules')})"
        )
        optim_keys = [f.name for f in dataclasses.fields(OptimSettings)]
        checks = ((raw, rule_keys, "rule"), (raw.get("depth"), depth_keys, "depth selector"))
        for keys, valid, where in (*checks, (raw.get("optim"), optim_keys, "optim")):
            if not isinstance(keys, dict):
                continue
            for key in sorted(set(keys) - set(valid)):
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PolicyError(f"{source}: {label}: unknown {where} key {key!r}{hint}; valid keys: {valid}")
        if isinstance(raw.get("depth"), dict):
            try:
                DepthSelector(**raw["depth"])
            except (PolicyError, TypeError) as err:
                raise PolicyError(f"{source}: {label}: {err}") from None


@dataclass
class LayerPolicy:
    """An ordered list of rules (first match wins) plus optional overrides.

    Args:
        rules: the rules, tried in order for every module.
        blocks: dotted path of the repeated-block container; auto-discovered when `None`.
        strict: every rule must decide at least one module (a rule that matches nothing, or
            only modules earlier rules already took, is an error rather than a silent no-op).
    """

    rules: list[Rule] = field(default_factory=list)
    blocks: str | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        self.rules = [Rule(**r) if isinstance(r, dict) else r for r in self.rules]
        if not self.rules:
            raise PolicyError("A policy needs at least one rule; `rules` is empty")
        for i, rule in enumerate(self.rules):
            label = rule.label(i)
            if not isinstance(rule, Rule):
                raise PolicyError(f"rule {i} must be a Rule or a mapping, got {type(rule).__name__}")
            if not rule.modules:
                raise PolicyError(f"{label}: `modules` is empty")
            for pattern in rule.modules:
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as err:
                        raise PolicyError(f"{label}: bad regex {pattern!r}: {err}") from None
            if rule.method not in SPECIAL_METHODS:
                try:
                    get_adapter_class(rule.method)
                except ValueError as err:
                    raise PolicyError(f"{label}: {err} (or 'none'/'full')") from None
            _method_errors(rule, label)
            check_rule_optim(rule.method, rule.optim, label)
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            key = json.dumps([rule.modules, dataclasses.asdict(rule.depth) if rule.depth else None], sort_keys=True)
            if key in seen:
                raise PolicyError(
                    f"{rule.label(i)} has the same `modules` and `depth` as rule {seen[key]}; it could never match"
                )
            seen[key] = i

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "policy") -> LayerPolicy:
        """Build from a plain mapping, validated by jsonargparse against this dataclass schema."""
        from jsonargparse import ArgumentParser

        if not isinstance(data, dict):
            raise PolicyError(f"{source}: a policy must be a mapping with `rules`, got {type(data).__name__}")
        data = copy.deepcopy(data)  # jsonargparse rewrites nested mappings in place
        _check_rule_mappings(data.get("rules"), source)  # errors that name the rule (jsonargparse's do not)
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "policy")
        try:
            cfg = parser.parse_object({"policy": data})
            built = parser.instantiate_classes(cfg)["policy"]
        except PolicyError as err:
            raise PolicyError(f"{source}: {err}") from None
        except Exception as err:  # jsonargparse reports schema errors (unknown keys, types)
            raise PolicyError(f"{source}: invalid policy: {err}") from None
        return built

    @classmethod
    def from_yaml(cls, path: str | Path) -> LayerPolicy:
        """Load a policy file; errors name the file."""
        import yaml

        path = Path(path)
        if not path.is_file() and (PRESETS_DIR / f"{path}.yaml").is_file():
            path = PRESETS_DIR / f"{path}.yaml"  # a preset name such as `mora_outer_dora_inner`
        if not path.is_file():
            raise PolicyError(f"Policy file {str(path)!r} does not exist (presets: {list_presets()})")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise PolicyError(f"{path}: YAML syntax error: {err}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def load(cls, policy: LayerPolicy | str | Path | dict[str, Any]) -> LayerPolicy:
        if isinstance(policy, LayerPolicy):
            return policy
        if isinstance(policy, dict):
            return cls.from_dict(policy)
        return cls.from_yaml(policy)

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

    # -- resolution ----------------------------------------------------------------------

    def resolve(self, model: nn.Module) -> Plan:
        """Decide every module's method. Pure: reads names and shapes only (meta-safe)."""
        blocks_path, num_blocks = discover_blocks(model, self.blocks)
        selected = []
        for i, rule in enumerate(self.rules):
            if rule.depth is None:
                selected.append(None)
                continue
            try:
                selected.append(rule.depth.blocks(num_blocks))
            except PolicyError as err:
                raise PolicyError(f"{rule.label(i)}: {err}") from None
        rows: list[PlanRow] = []
        decided = [0] * len(self.rules)
        shadowed = [0] * len(self.rules)
        unsupported: list[list[str]] = [[] for _ in self.rules]
        inside: list[str] = []  # prefixes of modules already decided (their children are skipped)
        shapes_checked: set[tuple] = set()
        for raw_name, module in model.named_modules():
            if not raw_name:
                continue
            name = normalise_name(raw_name)
            if isinstance(module, AdapterLinear):
                raise PolicyError(
                    f"Module {name!r} already carries a {module.method} adapter; remove it before resolving"
                )
            if any(name.startswith(p + ".") for p in inside):
                continue
            block, kind = _block_of(name, blocks_path)
            winner = None
            for i, rule in enumerate(self.rules):
                if not rule.matches_name(name):
                    continue
                if selected[i] is not None and (block is None or block not in selected[i]):
                    continue
                if winner is None:
                    winner = i
                else:
                    shadowed[i] += 1
            if winner is None:
                continue
            rule = self.rules[winner]
            label = rule.label(winner)
            if rule.method == "none":  # the whole subtree stays frozen
                decided[winner] += 1
                inside.append(name)
                continue
            if rule.method == "full":  # the whole subtree trains
                params = sum(p.numel() for p in module.parameters())
                if params == 0:
                    continue
                in_f, out_f = layer_shape(module) if is_supported_layer(module) else (0, 0)
                rows.append(PlanRow(name, block, kind, type(module).__name__, in_f, out_f, "full", {}, params, winner))
                decided[winner] += 1
                inside.append(name)
                continue
            if not is_supported_layer(module):
                if _owns_parameters(module) and not any(True for _ in module.children()):
                    unsupported[winner].append(f"{name} ({type(module).__name__})")
                continue
            in_f, out_f = layer_shape(module)
            cls = get_adapter_class(rule.method)
            key = (rule.method, json.dumps(rule.hparams, sort_keys=True, default=str), in_f, out_f)
            if key not in shapes_checked:
                try:
                    with torch.device("meta"):
                        cls(in_f, out_f, **rule.hparams)  # every hyper-parameter check, no memory
                except (ValueError, TypeError) as err:
                    raise PolicyError(f"{label} on {name!r} ({in_f}->{out_f}): {err}") from None
                shapes_checked.add(key)
            params = cls.count_parameters(in_f, out_f, **rule.hparams)
            rows.append(
                PlanRow(
                    name,
                    block,
                    kind,
                    type(module).__name__,
                    in_f,
                    out_f,
                    rule.method,
                    dict(rule.hparams),
                    params,
                    winner,
                )
            )
            decided[winner] += 1
            inside.append(name)
        for i, rule in enumerate(self.rules):
            if unsupported[i] and decided[i] == 0:
                names = [t.__name__ for t in supported_layer_types()]
                raise PolicyError(
                    f"{rule.label(i)} targets only modules {rule.method} cannot adapt: {unsupported[i][:5]}; "
                    f"supported types are {names} (use method 'full' to train such modules)"
                )
            if self.strict and decided[i] == 0:
                why = f" (the {shadowed[i]} module(s) it matches are taken by earlier rules)" if shadowed[i] else ""
                raise PolicyError(
                    f"{rule.label(i)} matches no module{why}; check `modules`/`depth` or set strict: false"
                )
        model_params = sum(p.numel() for p in model.parameters())
        for row in rows:  # per-rule optimizer settings travel with the plan (table, JSON, checkpoints)
            row.optim = self.rules[row.rule].optim.to_dict() if self.rules[row.rule].optim else {}
        return Plan(rows=rows, blocks_path=blocks_path, num_blocks=num_blocks, model_params=model_params)
