"""Per-rule optimizer settings, realised as param groups of whatever optimizer the user builds.

A hybrid policy is only a fair contest when each method trains at its own learning rate
(MoRA has no `alpha`: its step size *is* the learning rate). A rule may therefore carry

```yaml
optim: {lr_scale: 4.0}              # or lr: 3.0e-3 (absolute), weight_decay: 0.0, lora_plus_ratio: 16
```

At fit start (`AdapterCallback.on_fit_start`, after `configure_optimizers` and before a
checkpoint's optimizer state is restored) every param group that holds a parameter of such a
rule is split: that rule's parameters (per role, for LoRA+) move to a new group that copies the
original group's options with the rule's settings applied. The split is deterministic (source
group order, then rule index, then role), so a resumed run rebuilds the same groups and
Lightning restores their state one to one.

- `lr` is the rule's *base* learning rate: the group's learning-rate keys (`lr`, `initial_lr`,
  `max_lr`, `min_lr`) and the attached schedulers' per-group lists (`base_lrs`, `max_lrs`,
  `_last_lr`, ...) are multiplied by `lr / base`, so a warm-up or decay schedule keeps its shape.
  `lr_scale` multiplies the group's base rate instead.
- `lora_plus_ratio` multiplies the rate of the parameters a method declares with role `"B"`
  (`AdapterMethod.parameter_roles`): LoRA+, Hayou et al. 2024, arXiv 2402.12354, where
  `lr_B = ratio * lr_A` (the paper suggests ratios around 16). HF peft's `create_loraplus_optimizer`
  also gives 1-D parameters (DoRA's magnitude) the B rate; here only role `B` does, as in the paper.
- `weight_decay` replaces the group's weight decay.

Which rule owns a parameter comes from the plan (module name -> rule) and which role from the
adapter's `parameter_roles`; nothing here knows a concrete method.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .policy import Plan

# Group keys that hold a learning rate, scaled together so a schedule keeps its shape.
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
GROUP_TAG = "lightning_peft_rule"  # stored in each derived group (and so in optimizer checkpoints)
SINGLE_GROUP_OPTIMIZERS = ("LBFGS",)  # optimizers that refuse more than one param group


class OptimizerRegroupError(RuntimeError):
    """The user's optimizer cannot carry a policy's per-rule settings; the message names rule and optimizer."""


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
        from .policy import PolicyError

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
    from .policy import PolicyError, check_unknown_keys

    if value is None or isinstance(value, OptimSettings):
        return value
    if not isinstance(value, dict):
        raise PolicyError(f"`optim` must be a mapping of {sorted(vars(OptimSettings()))}, got {value!r}")
    check_unknown_keys(value, OptimSettings, "optim")
    return OptimSettings(**value) if value else None


def check_rule_optim(method: str, optim: OptimSettings | None) -> None:
    """Policy-time checks: settings on a rule that trains nothing, LoRA+ on a method without `B`."""
    from .adapters.base import get_adapter_class
    from .policy import PolicyError

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


# -- which parameter belongs to which rule ---------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """The settings one trainable parameter receives: its rule, its role, the rule's optim dict."""

    rule: int
    rule_name: str
    role: str | None
    settings: tuple[tuple[str, float], ...]

    @property
    def key(self) -> tuple[int, str]:
        return (self.rule, self.role or "")

    @property
    def tag(self) -> str:
        return f"{self.rule_name}/{self.role}" if self.role else self.rule_name

    def factor(self) -> float:
        """How much this parameter's rate differs from the rule's base rate (LoRA+ on `B`)."""
        ratio = dict(self.settings).get("lora_plus_ratio")
        return ratio if ratio is not None and self.role == "B" else 1.0


def rule_assignments(model: nn.Module, plan: Plan, rule_names: Sequence[str] | None = None) -> dict[int, Assignment]:
    """`id(parameter) -> Assignment` for every trainable parameter of a plan row with optim settings."""
    from .adapters.base import AdapterLinear
    from .policy import normalise_name

    modules = {normalise_name(n): m for n, m in model.named_modules() if n}
    out: dict[int, Assignment] = {}
    for row in plan.rows:
        optim = getattr(row, "optim", None) or {}
        module = modules.get(row.name)
        if not optim or module is None:
            continue
        name = rule_names[row.rule] if rule_names and row.rule < len(rule_names) else f"rule {row.rule}"
        settings = tuple(sorted(optim.items()))
        if isinstance(module, AdapterLinear):
            roles = type(module.adapter).parameter_roles
            named = [(roles.get(n.split(".")[0]), p) for n, p in module.adapter.named_parameters()]
        else:
            named = [(None, p) for p in module.parameters()]
        for role, p in named:
            if p.requires_grad:
                out[id(p)] = Assignment(row.rule, name, role if optim.get("lora_plus_ratio") else None, settings)
    return out


# -- splitting param groups ------------------------------------------------------------------


def _derived_group(group: dict[str, Any], a: Assignment, params: list[Any], where: str) -> tuple[dict, float]:
    """A copy of `group` holding `params`, with `a`'s settings applied; also the lr factor used."""
    settings = dict(a.settings)
    new = {k: v for k, v in group.items() if k != "params"}
    if any(k in settings for k in ("lr", "lr_scale", "lora_plus_ratio")):
        if "lr" not in group:
            raise OptimizerRegroupError(f"{where}: param group has no `lr`, so {a.tag} cannot set a learning rate")
        base = float(group.get("initial_lr", group["lr"]))
        target = settings["lr"] if "lr" in settings else base * settings.get("lr_scale", 1.0)
        target *= a.factor()
        if base == 0.0:  # no rate to scale from: set it (and its schedule base) outright
            new["lr"] = target
            new.update({"initial_lr": target} if "initial_lr" in group else {})
            factor = math.inf if target else 1.0
        else:
            factor = target / base
            for key in LR_KEYS:
                if key in group and isinstance(group[key], int | float | torch.Tensor):
                    new[key] = group[key] * factor
    else:
        factor = 1.0
    if "weight_decay" in settings:
        if "weight_decay" not in group:
            raise OptimizerRegroupError(f"{where}: param group has no `weight_decay` for {a.tag} to set")
        new["weight_decay"] = settings["weight_decay"]
    new["params"] = params
    new[GROUP_TAG] = a.tag
    return new, factor


def split_param_groups(
    optimizer: torch.optim.Optimizer, assignments: dict[int, Assignment], where: str
) -> tuple[list[int], list[float]] | None:
    """Split `optimizer`'s groups in place; returns (source group, lr factor) per new group, or `None`."""
    if not any(id(p) in assignments for g in optimizer.param_groups for p in g["params"]):
        return None
    if any(GROUP_TAG in g for g in optimizer.param_groups):
        return None  # already split (the same optimizer object passed to a second fit)
    if type(optimizer).__name__ in SINGLE_GROUP_OPTIMIZERS:
        raise OptimizerRegroupError(
            f"{where} supports a single param group, so per-rule `optim` settings "
            "cannot be applied; use another optimizer or drop the rules' `optim`"
        )
    groups: list[dict[str, Any]] = []
    sources: list[int] = []
    factors: list[float] = []
    for gi, group in enumerate(optimizer.param_groups):
        stay: list[Any] = []
        moved: dict[tuple[int, str], tuple[Assignment, list[Any]]] = {}
        for p in group["params"]:
            a = assignments.get(id(p))
            if a is None:
                stay.append(p)
            else:
                moved.setdefault(a.key, (a, []))[1].append(p)
        if stay or not moved:
            groups.append({**group, "params": stay})
            sources.append(gi)
            factors.append(1.0)
        for key in sorted(moved):
            a, params = moved[key]
            new, factor = _derived_group(group, a, params, f"{where}, param group {gi}")
            groups.append(new)
            sources.append(gi)
            factors.append(factor)
    optimizer.param_groups[:] = groups
    return sources, factors


# Per-param-group lists that torch's schedulers keep: learning rates are rescaled per new group,
# the rest (lambdas, momenta) copied from the group a new group was split from.
SCALED_LISTS = ("_last_lr", "min_lrs", "max_lrs")
COPIED_LISTS = ("lr_lambdas", "base_momentums", "max_momentums")


def _remap_scheduler(scheduler: Any, sources: list[int], factors: list[float], n_old: int, where: str) -> None:
    """Expand a scheduler's per-group lists to the new groups (`base_lrs` from the groups, lr lists scaled)."""
    for nested in getattr(scheduler, "_schedulers", None) or []:  # SequentialLR, ChainedScheduler
        _remap_scheduler(nested, sources, factors, n_old, where)
    groups = scheduler.optimizer.param_groups
    for attr, value in list(vars(scheduler).items()):
        if not isinstance(value, list) or len(value) != n_old:
            continue
        if attr == "base_lrs":
            new = [g.get("initial_lr", g.get("lr")) for g in groups]
        elif attr in SCALED_LISTS:
            pairs = enumerate(zip(sources, factors, strict=True))
            new = [value[s] * f if math.isfinite(f) else groups[i]["lr"] for i, (s, f) in pairs]
        elif attr in COPIED_LISTS:
            new = [value[s] for s in sources]
        elif type(scheduler).__module__.startswith("torch.") or attr.startswith("_"):
            continue  # torch's other lists (SequentialLR's milestones) are not per param group
        else:
            raise OptimizerRegroupError(
                f"{where}: scheduler {type(scheduler).__name__} keeps a list `{attr}` as long as the param groups; "
                "it cannot be split per rule (build the groups yourself, or drop the rules' `optim`)"
            )
        setattr(scheduler, attr, new)


def apply_rule_settings(
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Iterable[Any],
    model: nn.Module,
    plan: Plan,
    rule_names: Sequence[str] | None = None,
) -> list[str]:
    """Give every rule with `optim` settings its own param groups in each optimizer that holds its parameters.

    Returns one line per derived group (for the fit-start log). Raises `OptimizerRegroupError`
    before changing an optimizer it cannot regroup.
    """
    assignments = rule_assignments(model, plan, rule_names)
    if not assignments:
        return []
    schedulers = list(schedulers)
    lines: list[str] = []
    for oi, optimizer in enumerate(optimizers):
        where = f"optimizer {oi} ({type(optimizer).__name__})"
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise OptimizerRegroupError(f"{where} is not a torch.optim.Optimizer; per-rule `optim` settings need one")
        n_old = len(optimizer.param_groups)
        split = split_param_groups(optimizer, assignments, where)
        if split is None:
            continue
        for scheduler in schedulers:
            if getattr(scheduler, "optimizer", None) is optimizer:
                _remap_scheduler(scheduler, *split, n_old, where)
        lines += [group_summary(g) for g in optimizer.param_groups if GROUP_TAG in g]
    return lines


def group_summary(group: dict[str, Any]) -> str:
    lr = group.get("lr")
    wd = group.get("weight_decay")
    return f"{group[GROUP_TAG]}: {len(group['params'])} tensor(s), lr {float(lr):.3g}" + (
        f", weight_decay {wd:g}" if isinstance(wd, int | float) else ""
    )
