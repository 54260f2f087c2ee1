"""Module-name prefixes: the same adapters named from a LightningModule (`model.model.layers.0...`)
or from the Hugging Face model inside it (`model.layers.0...`).

Plans and adapter files name modules relative to the object they were injected into. These
helpers move a plan and its tensors between the two views, and turn a missing module name
into a sentence that says which prefix is likely at fault.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from lightning_peft.core.hints import option_hint
from lightning_peft.policy import Plan, normalise_name


def submodule_prefix(submodule: str | None) -> str:
    """`"model"` -> `"model."`; `None` or `""` -> `""` (names as the plan has them)."""
    return normalise_name(submodule) + "." if submodule else ""


def add_prefix(plan: Plan, tensors: dict[str, Tensor], prefix: str) -> tuple[Plan, dict[str, Tensor]]:
    """The plan and tensors as seen from the module that holds the named one at `prefix`."""
    if not prefix:
        return plan, tensors
    rows = [dataclasses.replace(r, name=prefix + r.name) for r in plan.rows]
    blocks = None if plan.blocks_path is None else prefix + plan.blocks_path
    return dataclasses.replace(plan, rows=rows, blocks_path=blocks), {prefix + k: v for k, v in tensors.items()}


def strip_prefix(plan: Plan, tensors: dict[str, Tensor], prefix: str) -> tuple[Plan, dict[str, Tensor]]:
    """The plan and tensors relative to the submodule at `prefix`; every row must lie inside it."""
    if not prefix:
        return plan, tensors
    outside = [r.name for r in plan.rows if not r.name.startswith(prefix)]
    if outside:
        raise ValueError(f"planned module(s) {outside[:4]} lie outside the submodule {prefix[:-1]!r}")
    rows = [dataclasses.replace(r, name=r.name[len(prefix) :]) for r in plan.rows]
    blocks = plan.blocks_path
    if blocks is not None and blocks.startswith(prefix):
        blocks = blocks[len(prefix) :]
    stripped = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return dataclasses.replace(plan, rows=rows, blocks_path=blocks), stripped


def prefix_hint(name: str, module_names: list[str]) -> str:
    """A sentence suggesting the submodule/prefix fix when `name` is absent only because of a prefix."""
    longer = [m for m in module_names if m.endswith("." + name)]
    if longer:
        prefix = longer[0][: -len(name) - 1]
        return (
            f" A module {longer[0]!r} exists: the stored names lack the prefix {prefix + '.'!r}; "
            f"pass {option_hint('submodule', prefix, prefix)}."
        )
    shorter = [m for m in module_names if name.endswith("." + m)]
    if shorter:
        prefix = name[: -len(shorter[0]) - 1]
        return (
            f" A module {shorter[0]!r} exists: the stored names carry the extra prefix {prefix + '.'!r} (saved from "
            f"the module holding this one as {prefix!r}); load into that module, or save with submodule={prefix!r}."
        )
    return ""


def plan_prefix_hint(stored: Plan, live: Plan) -> str:
    """A sentence when two plans name the same modules but one adds a prefix; else `""`."""
    a, b = [r.name for r in stored.rows], [r.name for r in live.rows]
    if not a or len(a) != len(b):
        return ""
    for shorter, longer, lacks in ((a, b, True), (b, a, False)):
        prefix = longer[0][: len(longer[0]) - len(shorter[0])]
        if prefix and prefix.endswith(".") and all(x == prefix + y for x, y in zip(longer, shorter, strict=True)):
            if lacks:
                hint = option_hint("submodule", prefix[:-1], prefix[:-1])
                return f" The stored names lack the prefix {prefix!r}: pass {hint}."
            return (
                f" The stored names carry the extra prefix {prefix!r}: load into the module that holds this one "
                f"as {prefix[:-1]!r}, or save with submodule={prefix[:-1]!r}."
            )
    return ""
