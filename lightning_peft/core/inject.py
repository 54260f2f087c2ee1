"""Apply a `Plan` to a model, undo it, merge it, and save/load the adapters alone.

Injection replaces each planned `nn.Linear`/`Conv1D` by an `AdapterLinear`, freezes every
other parameter, and leaves `full` modules trainable. The plan is stored on the model
(`get_plan`), which makes injection idempotent and lets checkpoints carry it.

Adapter files are a directory with `adapters.safetensors` (adapter tensors plus the weights
of `full` modules, keyed by normalised module name, and the plan in its header) and
`plan.json` (a readable copy of the plan): the size of the adapters, not of the model. The
safetensors file alone is authoritative, so one atomic rename makes a save all-or-nothing.
Loading goes through `stored`, which checks everything (plan, names, shapes, dtypes,
NaN/inf, file integrity) before a single tensor of the model changes.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.adapters.base import AdapterLinear, get_adapter_class, layer_shape
from lightning_peft.core.io import atomic_write
from lightning_peft.core.names import add_prefix, plan_prefix_hint, prefix_hint, strip_prefix, submodule_prefix
from lightning_peft.core.stored import (
    ADAPTER_FILE,
    PLAN_FILE,
    PLAN_METADATA_KEY,
    AdapterStateError,
    check_state,
    plan_from_stored,
    plans_differ,
    read_adapter_dir,
)
from lightning_peft.policy import LayerPolicy, Plan, normalise_name

PLAN_ATTR = "_lightning_peft_plan"
_FLAGS_ATTR = "_lightning_peft_requires_grad"
CHECKPOINT_KEY = "lightning_peft"


def get_plan(model: nn.Module) -> Plan | None:
    """The plan injected into `model`, or `None`."""
    return getattr(model, PLAN_ATTR, None)


def _modules_by_name(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """normalised name -> (raw name, module)."""
    return {normalise_name(n): (n, m) for n, m in model.named_modules() if n}


def _replace(model: nn.Module, raw_name: str, new: nn.Module) -> None:
    parent_name, _, child = raw_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_plan_fits(model: nn.Module, plan: Plan, modules: dict[str, tuple[str, nn.Module]]) -> None:
    for row in plan.rows:
        if row.name not in modules:
            hint = prefix_hint(row.name, list(modules))
            raise AdapterStateError(f"Plan module {row.name!r} does not exist in {type(model).__name__}.{hint}")
        module = modules[row.name][1]
        if row.method == "full":
            continue
        if type(module).__name__ != row.layer_type:
            raise AdapterStateError(
                f"Plan expects {row.name!r} to be a {row.layer_type}, found {type(module).__name__}"
            )
        if layer_shape(module) != (row.in_features, row.out_features):
            raise AdapterStateError(
                f"Shape mismatch for {row.name!r}: plan has {row.in_features}->{row.out_features}, "
                f"model has {layer_shape(module)[0]}->{layer_shape(module)[1]}"
            )


def inject_adapters(model: nn.Module, policy: LayerPolicy | Plan | str | Path | dict[str, Any]) -> Plan:
    """Resolve (if given a policy) and apply a plan; idempotent for the same plan.

    Returns:
        The applied plan. Raises `PolicyError`/`AdapterStateError` before changing anything
        when the policy does not fit, or when the model already carries a different plan.
    """
    existing = get_plan(model)
    if isinstance(policy, Plan):
        plan = policy
    else:  # an already injected model is resolved as if bare, to compare plans
        plan = LayerPolicy.load(policy).resolve(model) if existing is None else _resolve_on_base(model, policy)
    if existing is not None:
        if existing.fingerprint() != plan.fingerprint():
            raise AdapterStateError(
                "The model already carries a different adapter plan; call remove_adapters() first "
                f"({_first_difference(existing, plan)})"
            )
        settings = {row.name: row.optim for row in plan.rows}  # optimizer settings are no part of the adapters:
        for row in existing.rows:  # the policy given now decides them (e.g. after `restore_from_checkpoint`)
            row.optim = settings.get(row.name, row.optim)
        return existing
    modules = _modules_by_name(model)
    _check_plan_fits(model, plan, modules)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for row in plan.rows:
        raw_name, module = modules[row.name]
        if row.method == "full":
            module.requires_grad_(True)
            continue
        # Build on the base's device when it is `meta`: a meta model then allocates nothing at all.
        with torch.device("meta") if module.weight.is_meta else contextlib.nullcontext():
            adapter = get_adapter_class(row.method)(row.in_features, row.out_features, **row.hparams)
        layer = AdapterLinear(module, adapter)
        layer.name = row.name
        _replace(model, raw_name, layer)
    setattr(model, PLAN_ATTR, plan)
    setattr(model, _FLAGS_ATTR, flags)
    return plan


def _resolve_on_base(model: nn.Module, policy: Any) -> Plan:
    """Resolve a policy against an injected model as if its adapters were absent."""
    layers = find_adapters(model)
    saved = {}
    try:
        for raw_name, layer in layers:
            saved[raw_name] = layer
            _replace(model, raw_name, layer.base)
        return LayerPolicy.load(policy).resolve(model)
    finally:
        for raw_name, layer in saved.items():
            _replace(model, raw_name, layer)


def _first_difference(a: Plan, b: Plan) -> str:
    fa, fb = a.fingerprint(), b.fingerprint()
    for x, y in zip(fa, fb, strict=False):
        if x != y:
            return f"module {x[0]!r}: {x[1]} {x[2]} vs {y[0]!r}: {y[1]} {y[2]}"
    return f"{len(fa)} vs {len(fb)} planned modules"


def find_adapters(model: nn.Module) -> list[tuple[str, AdapterLinear]]:
    """All `AdapterLinear` modules of `model`, with their raw names, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (inference with zero overhead); all or nothing.

    Every merged weight is computed and checked (finite in the base dtype) before any layer is
    changed, so a failure leaves the model bit-identical. Memory stays at one layer's weight:
    the check pass discards each result and the merge pass recomputes it.
    """
    layers = [(n, layer) for n, layer in find_adapters(model) if not layer.merged]
    for raw_name, layer in layers:
        layer.check_mergeable(normalise_name(raw_name))  # a quantized base is refused before any layer changes
    with torch.no_grad():
        for raw_name, layer in layers:
            weight = layer.base_weight()
            merged = layer.adapter.merge_weight(weight.to(layer.adapter_dtype)).to(weight.dtype)
            if not bool(torch.isfinite(merged).all()):
                raise AdapterStateError(
                    f"Merging {normalise_name(raw_name)!r} ({layer.method}) gives non-finite weights in "
                    f"{weight.dtype}; no layer was merged"
                )
    for _, layer in layers:
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in find_adapters(model):
        layer.unmerge()


def remove_adapters(model: nn.Module, merge: bool = False) -> nn.Module:
    """Undo `inject_adapters`: put the base layers back (merged first if `merge`)."""
    if merge:
        merge_adapters(model)  # all layers or none, before anything is removed
    for raw_name, layer in find_adapters(model):
        layer.unmerge() if not merge else None
        _replace(model, raw_name, layer.base)
    flags = getattr(model, _FLAGS_ATTR, None)
    if flags is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        delattr(model, _FLAGS_ATTR)
    if hasattr(model, PLAN_ATTR):
        delattr(model, PLAN_ATTR)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors and `full` module weights keyed by normalised name (what a file holds)."""
    plan = get_plan(model)
    if plan is None:
        raise AdapterStateError("The model carries no adapters (inject_adapters was not applied)")
    modules = _modules_by_name(model)
    state: dict[str, Tensor] = {}
    for row in plan.rows:
        module = modules[row.name][1]
        if row.method == "full":
            for key, value in module.state_dict().items():
                state[f"{row.name}.{key}"] = value
        else:
            for key, value in module.adapter.state_dict().items():
                state[f"{row.name}.adapter.{key}"] = value
    return state


def save_adapters(model: nn.Module, directory: str | Path, submodule: str | None = None) -> Path:
    """Write `adapters.safetensors` (tensors + plan in its header) and `plan.json` into `directory`.

    All or nothing: the safetensors file is the whole state and is replaced in one atomic
    rename; `plan.json` is a readable copy written after it (loading ignores it when the
    header has the plan). Non-finite tensors are refused before anything is written.
    `submodule` (e.g. `"model"` for a LightningModule's `self.model`) stores names relative to
    that submodule, so the files load into the bare Hugging Face model.
    """
    from safetensors.torch import save_file

    if any(layer.merged for _, layer in find_adapters(model)):
        raise AdapterStateError("Cannot save adapters of a merged model; call unmerge_adapters() first")
    restarts = model_restarts(model)
    if restarts:
        raise AdapterStateError(
            f"Cannot save adapters alone: the base weights hold {restarts} merged restart cycle(s), "
            "so the adapters mean nothing on the original base. Save a Lightning checkpoint (it carries the "
            "merged bases), or export the merged model (`export_merged`, `lightning-peft export`)"
        )
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise AdapterStateError(f"Refusing to save adapters: tensor(s) {bad[:6]} hold NaN/inf; nothing was written")
    plan = get_plan(model)
    assert plan is not None
    try:
        plan, state = strip_prefix(plan, state, submodule_prefix(submodule))
    except ValueError as err:
        raise AdapterStateError(f"save_adapters(submodule={submodule!r}): {err}") from None
    plan_json = json.dumps(plan.to_dict(), indent=1)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "lightning-peft", PLAN_METADATA_KEY: plan_json}
    atomic_write(directory / ADAPTER_FILE, lambda tmp: save_file(state, tmp, metadata=metadata))
    atomic_write(directory / PLAN_FILE, lambda tmp: Path(tmp).write_text(plan_json))
    return directory


def load_adapters(model: nn.Module, directory: str | Path, submodule: str | None = None) -> Plan:
    """Inject the stored plan (if the model has none) and load the stored tensors.

    `submodule`: the stored names are relative to this submodule of `model` (files saved from
    the bare Hugging Face model, loaded into the LightningModule holding it as `self.model`).
    Everything is validated first; on any error the model is left as it was.
    """

    plan, tensors = read_adapter_dir(directory)
    plan, tensors = add_prefix(plan, tensors, submodule_prefix(submodule))
    source = str(Path(directory) / ADAPTER_FILE)
    if any(layer.merged for _, layer in find_adapters(model)):
        raise AdapterStateError("Cannot load adapters into a merged model; call unmerge_adapters() first")
    existing = get_plan(model)
    if existing is not None and existing.fingerprint() != plan.fingerprint():
        hint = plan_prefix_hint(plan, existing)
        raise AdapterStateError(
            f"{source}: its plan differs from the model's ({_first_difference(existing, plan)}).{hint}"
        )
    if existing is None:
        _check_plan_fits(model, plan, _modules_by_name(model))
        inject_adapters(model, plan)
    try:  # `full` weights are only checkable on the injected model
        check_state(tensors, adapter_state_dict(model), source, exact_keys=True)
    except AdapterStateError:
        if existing is None:
            remove_adapters(model)
        raise
    load_adapter_state(model, tensors)
    return plan


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy checked tensors into the live adapters (dtype/device of the live tensors kept)."""
    live = adapter_state_dict(model)
    for key, value in state.items():
        live[key].copy_(value)


def check_checkpoint(model: nn.Module, checkpoint: dict[str, Any], source: str = "checkpoint") -> None:
    """Raise if `checkpoint` does not fit the adapters injected into `model`.

    Checks the stored plan (same modules, methods, hyper-parameters), and that every trainable
    tensor is present with the right shape and kind of dtype and holds no NaN/inf: with
    non-strict loading a missing key would otherwise keep its fresh random value silently.
    """
    if get_plan(model) is None:
        return
    check_checkpoint_plan(model, checkpoint, source)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise AdapterStateError(f"{source}: has no `state_dict` mapping")
    required = trainable_state_keys(model)
    if stored_restarts(checkpoint, source):  # merged cycles live in the base weights: they must be there
        required |= base_weight_keys(model)
    scan = (required | base_weight_keys(model)) & set(state)
    check_state(state, model.state_dict(), source, required=required, scan=scan)


def check_checkpoint_plan(model: nn.Module, checkpoint: dict[str, Any], source: str = "checkpoint") -> None:
    """Raise if the plan stored in `checkpoint` differs from the one injected into `model`."""
    live = get_plan(model)
    stored = checkpoint.get(CHECKPOINT_KEY)
    if live is None or stored is None:
        return
    if not isinstance(stored, dict) or "plan" not in stored:
        raise AdapterStateError(f"{source}: `{CHECKPOINT_KEY}` entry is not a lightning-peft record")
    mismatch = plans_differ(plan_from_stored(stored["plan"], source), live, what="checkpoint")
    if mismatch:
        raise AdapterStateError(f"{source}: written with a different adapter plan: {mismatch}")


def trainable_state_keys(model: nn.Module) -> set[str]:
    """`state_dict` keys an adapter-only checkpoint keeps: trainable params and adapter buffers,
    plus the base weights that merge-and-restart changed."""
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    keys |= {n for n in model.state_dict() if ".adapter." in n}
    keys |= base_weight_keys(model, restarted_only=True)
    return keys


def base_weight_keys(model: nn.Module, restarted_only: bool = False) -> set[str]:
    """`state_dict` keys of every adapted module's base weight (only those merge-and-restart changed)."""
    return {f"{raw}.base.weight" for raw, layer in find_adapters(model) if layer.restarts or not restarted_only}


def model_restarts(model: nn.Module) -> int:
    """How many merge-and-restart cycles the adapted modules' base weights hold (0: the original ones)."""
    return max((layer.restarts for _, layer in find_adapters(model)), default=0)


def stored_restarts(checkpoint: dict[str, Any], source: str = "checkpoint") -> int:
    """The restart count a checkpoint records (0 when it records none); a bad value is an error."""
    stored = checkpoint.get(CHECKPOINT_KEY)
    value = stored.get("restarts", 0) if isinstance(stored, dict) else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AdapterStateError(f"{source}: `{CHECKPOINT_KEY}.restarts` must be a non-negative integer, got {value!r}")
    return value


def set_restarts(model: nn.Module, cycle: int) -> None:
    """Put every adapted module in the state of cycle `cycle` (after its base weights were loaded)."""
    for _, layer in find_adapters(model):
        layer.set_restarts(cycle)
