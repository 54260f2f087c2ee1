"""A rule's optimizer settings (`optim:`): validated with the policy, applied at fit start by
`lightning_peft.callbacks.optim_groups` as param groups of the user's optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning_peft.adapters.base import get_adapter_class
from lightning_peft.policy.errors import PolicyError, check_unknown_keys


@dataclass
class OptimSettings:
    """Per-rule optimizer settings (all optional; set `lr` or `lr_scale`, not both).

    Args:
        lr: the rule's absolute base learning rate.
        lr_scale: multiply the optimizer group's base learning rate by this.
        weight_decay: replace the group's weight decay.
        lora_plus_ratio: LoRA+ (arXiv 2402.12354): parameters with role `B` train at
            `ratio` times the rule's rate. Only for methods that declare a `B` role.
    """

    lr: float | None = None
    lr_scale: float | None = None
    weight_decay: float | None = None
    lora_plus_ratio: float | None = None

    def __post_init__(self) -> None:
        for name in ("lr", "lr_scale", "weight_decay", "lora_plus_ratio"):
            value = getattr(self, name)
            if value is None:
                continue
            bad = isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            if bad or value < 0 or (value == 0 and name != "weight_decay"):
                kind = "a non-negative" if name == "weight_decay" else "a positive"
                raise PolicyError(f"optim `{name}` must be {kind} finite number, got {value!r}")
            setattr(self, name, float(value))
        if self.lr is not None and self.lr_scale is not None:
            raise PolicyError(f"optim sets both `lr` ({self.lr}) and `lr_scale` ({self.lr_scale}); choose one")

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def describe(self) -> str:
        """Short text for the plan table, e.g. `lr x4, wd 0, B x16`."""
        parts = []
        if self.lr is not None:
            parts.append(f"lr {self.lr:g}")
        if self.lr_scale is not None:
            parts.append(f"lr x{self.lr_scale:g}")
        if self.weight_decay is not None:
            parts.append(f"wd {self.weight_decay:g}")
        if self.lora_plus_ratio is not None:
            parts.append(f"B x{self.lora_plus_ratio:g}")
        return ", ".join(parts)


def as_optim_settings(value: OptimSettings | dict[str, Any] | None) -> OptimSettings | None:
    """`None`, a mapping or `OptimSettings` -> `OptimSettings` (an empty mapping is `None`)."""
    if value is None or isinstance(value, OptimSettings):
        return value
    if not isinstance(value, dict):
        raise PolicyError(f"`optim` must be a mapping of {sorted(vars(OptimSettings()))}, got {value!r}")
    check_unknown_keys(value, OptimSettings, "optim")
    return OptimSettings(**value) if value else None


def check_rule_optim(method: str, optim: OptimSettings | None) -> None:
    """Policy-time checks: settings on a rule that trains nothing, LoRA+ on a method without `B`."""
    if optim is None:
        return
    if method == "none":
        raise PolicyError("method 'none' trains nothing, so its `optim` settings would be ignored")
    if optim.lora_plus_ratio is not None:
        roles = {} if method == "full" else get_adapter_class(method).parameter_roles
        if "B" not in roles.values():
            raise PolicyError(
                f"`lora_plus_ratio` needs a method with a `B` factor; {method!r} declares roles "
                f"{sorted(set(roles.values()))}"
            )
