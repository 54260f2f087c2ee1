"""A policy rule: where it applies and what it does (method, hyper-parameters, optimizer settings)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from lightning_peft.adapters.base import check_hyperparameters, get_adapter_class, hyperparameter_names
from lightning_peft.policy.errors import PolicyError, check_fields, check_unknown_keys
from lightning_peft.policy.matching import pattern_matches
from lightning_peft.policy.optim import OptimSettings, as_optim_settings, check_rule_optim
from lightning_peft.policy.schema import signature_types, type_error
from lightning_peft.policy.selectors import DepthSelector

SPECIAL_METHODS = ("none", "full")


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
