"""Apply a `Plan` to a model, undo it, merge it, and save/load the adapters alone.

Injection replaces each planned `nn.Linear`/`Conv1D` by an `AdapterLinear`, freezes every
other parameter, and leaves `full` modules trainable. The plan is stored on the model
(`get_plan`), which makes injection idempotent and lets checkpoints carry it.

Adapter files are a directory with `adapters.safetensors` (adapter tensors plus the weights
of `full` modules, keyed by normalised module name) and `plan.json`: the size of the
adapters, not of the model. Loading checks everything (plan, names, shapes, file integrity)
before it changes a single tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adapters.base import AdapterLinear, get_adapter_class, layer_shape
from .policy import LayerPolicy, Plan, normalise_name

PLAN_ATTR = "_lightning_peft_plan"
_FLAGS_ATTR = "_lightning_peft_requires_grad"
ADAPTER_FILE = "adapters.safetensors"
PLAN_FILE = "plan.json"


class AdapterStateError(ValueError):
    """An adapter file or checkpoint that does not fit the live model."""


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
            from .names import prefix_hint

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
    """Fold every adapter into its base weight (inference with zero overhead)."""
    for _, layer in find_adapters(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in find_adapters(model):
        layer.unmerge()


def remove_adapters(model: nn.Module, merge: bool = False) -> nn.Module:
    """Undo `inject_adapters`: put the base layers back (merged first if `merge`)."""
    for raw_name, layer in find_adapters(model):
        layer.merge() if merge else layer.unmerge()
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


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write via a temporary file in the same directory, fsync, then `os.replace`: never a torn file.

    The rename is atomic because source and target share a directory (and so a filesystem).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapters(model: nn.Module, directory: str | Path, submodule: str | None = None) -> Path:
    """Write `adapters.safetensors` and `plan.json` into `directory` (atomically).

    `submodule` (e.g. `"model"` for a LightningModule's `self.model`) stores names relative to
    that submodule, so the files load into the bare Hugging Face model.
    """
    from safetensors.torch import save_file

    from .names import strip_prefix, submodule_prefix

    if any(layer.merged for _, layer in find_adapters(model)):
        raise AdapterStateError("Cannot save adapters of a merged model; call unmerge_adapters() first")
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    plan = get_plan(model)
    assert plan is not None
    try:
        plan, state = strip_prefix(plan, state, submodule_prefix(submodule))
    except ValueError as err:
        raise AdapterStateError(f"save_adapters(submodule={submodule!r}): {err}") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / ADAPTER_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "lightning-peft"}))
    atomic_write(directory / PLAN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(plan.to_dict(), indent=1)))
    return directory


def read_adapter_dir(directory: str | Path) -> tuple[Plan, dict[str, Tensor]]:
    """Read and integrity-check an adapter directory without touching any model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    plan_path, tensor_path = directory / PLAN_FILE, directory / ADAPTER_FILE
    for path in (plan_path, tensor_path):
        if not path.is_file():
            raise AdapterStateError(f"Adapter file {str(path)!r} is missing")
    try:
        plan = Plan.from_dict(json.loads(plan_path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise AdapterStateError(f"{plan_path}: not a valid lightning-peft plan ({err})") from None
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterStateError(f"{tensor_path}: truncated or corrupted safetensors file ({err})") from None
    return plan, tensors


def check_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Raise naming each module whose stored tensors are missing, unexpected or mis-shaped."""
    live = adapter_state_dict(model)
    missing = sorted(set(live) - set(state))
    unexpected = sorted(set(state) - set(live))
    problems = []
    if missing:
        problems.append(f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    for key in sorted(set(live) & set(state)):
        if tuple(live[key].shape) != tuple(state[key].shape):
            problems.append(f"shape of {key}: stored {tuple(state[key].shape)}, model {tuple(live[key].shape)}")
    if problems:
        raise AdapterStateError("Adapter state does not fit the model: " + "; ".join(problems))


def load_adapters(model: nn.Module, directory: str | Path, submodule: str | None = None) -> Plan:
    """Inject the stored plan (if the model has none) and load the stored tensors.

    `submodule`: the stored names are relative to this submodule of `model` (files saved from
    the bare Hugging Face model, loaded into the LightningModule holding it as `self.model`).
    Everything is validated first; on any error the model is left as it was.
    """
    from .names import add_prefix, submodule_prefix

    plan, tensors = read_adapter_dir(directory)
    plan, tensors = add_prefix(plan, tensors, submodule_prefix(submodule))
    if any(layer.merged for _, layer in find_adapters(model)):
        raise AdapterStateError("Cannot load adapters into a merged model; call unmerge_adapters() first")
    existing = get_plan(model)
    if existing is not None and existing.fingerprint() != plan.fingerprint():
        from .names import plan_prefix_hint

        hint = plan_prefix_hint(plan, existing)
        raise AdapterStateError(
            f"{directory}: its plan differs from the model's ({_first_difference(existing, plan)}).{hint}"
        )
    if existing is None:
        _check_plan_fits(model, plan, _modules_by_name(model))
        _check_state_against_plan(plan, tensors)
        inject_adapters(model, plan)
        try:  # `full` weights and unexpected keys are only checkable on the injected model
            check_adapter_state(model, tensors)
        except AdapterStateError:
            remove_adapters(model)
            raise
    else:
        check_adapter_state(model, tensors)
    load_adapter_state(model, tensors)
    return plan


def _check_state_against_plan(plan: Plan, tensors: dict[str, Tensor]) -> None:
    """Shape checks against a plan before injecting (uses meta-device adapters: no memory)."""
    expected: dict[str, tuple[int, ...]] = {}
    for row in plan.rows:
        if row.method == "full":
            continue
        with torch.device("meta"):
            adapter = get_adapter_class(row.method)(row.in_features, row.out_features, **row.hparams)
        for key, value in adapter.state_dict().items():
            expected[f"{row.name}.adapter.{key}"] = tuple(value.shape)
    for key, shape in expected.items():
        if key not in tensors:
            raise AdapterStateError(f"Adapter state is missing {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise AdapterStateError(f"shape of {key}: stored {tuple(tensors[key].shape)}, plan needs {shape}")


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy checked tensors into the live adapters (dtype/device of the live tensors kept)."""
    live = adapter_state_dict(model)
    for key, value in state.items():
        live[key].copy_(value)


def trainable_state_keys(model: nn.Module) -> set[str]:
    """`state_dict` keys an adapter-only checkpoint keeps: trainable params and adapter buffers."""
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    keys |= {n for n in model.state_dict() if ".adapter." in n}
    return keys
