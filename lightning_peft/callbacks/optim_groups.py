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

from lightning_peft.adapters.base import AdapterLinear
from lightning_peft.core.stored import AdapterStateError
from lightning_peft.policy import normalise_name

if TYPE_CHECKING:
    from lightning_peft.policy import Plan

# Group keys that hold a learning rate, scaled together so a schedule keeps its shape.
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
GROUP_TAG = "lightning_peft_rule"  # stored in each derived group (and so in optimizer checkpoints)
SINGLE_GROUP_OPTIMIZERS = ("LBFGS",)  # optimizers that refuse more than one param group


class OptimizerRegroupError(RuntimeError):
    """The user's optimizer cannot carry a policy's per-rule settings; the message names rule and optimizer."""


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


# -- resuming ----------------------------------------------------------------------------------


def _describe_optim(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {float(v):g}" for k, v in sorted(settings.items())) or "no optim settings"


def changed_rule_settings(stored: Plan, live: Plan, rule_names: Sequence[str] | None = None) -> list[str]:
    """Per rule of the live policy, `"rule 'x': checkpoint <settings>, now <settings>"` where a module's
    `optim` settings differ between a checkpoint's plan and the live one (first module per rule)."""
    before = {row.name: row.optim or {} for row in stored.rows}
    changed: dict[str, str] = {}
    for row in live.rows:
        old, new = before.get(row.name), row.optim or {}
        if old is None or {k: float(v) for k, v in old.items()} == {k: float(v) for k, v in new.items()}:
            continue  # a module only one side has is a plan mismatch, reported by the plan check
        name = rule_names[row.rule] if rule_names and row.rule < len(rule_names) else f"rule {row.rule}"
        changed.setdefault(
            name, f"rule {name!r} ({row.name}): checkpoint {_describe_optim(old)}, now {_describe_optim(new)}"
        )
    return list(changed.values())


def check_resumed_rule_settings(stored: Plan, live: Plan, source: str, rule_names: Sequence[str] | None = None) -> None:
    """Refuse to resume a fit whose rules' `optim` settings changed since the checkpoint was written.

    Lightning restores the checkpoint's param groups over the ones the live settings built: with
    as many groups, the checkpoint's rates silently win; with another number, torch fails with a
    message that names no rule. Raises `AdapterStateError` naming each changed rule.
    """
    changed = changed_rule_settings(stored, live, rule_names)
    if changed:
        raise AdapterStateError(
            f"{source}: cannot resume: per-rule optimizer settings changed since this checkpoint was written: "
            + "; ".join(changed)
            + ". Resuming restores the checkpoint's param groups, so the new settings would not apply. To resume, "
            "set these rules' `optim:` back as they were; to train on with the new settings, start a new fit from "
            "the checkpoint's weights (`restore_from_checkpoint(model, ckpt)`, then fit without `ckpt_path`)."
        )
