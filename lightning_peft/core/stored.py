"""Stored state, checked before it touches a model: checkpoints, adapter files, plans.

Every loading path (`load_adapters`, `restore_from_checkpoint`, a Lightning resume through
`AdapterCallback`) reads through this module, so each one refuses the same things, naming
the file and the tensor:

- pickles that are more than tensors and plain containers (`torch.load(weights_only=True)`,
  always): a crafted `.ckpt` cannot run code;
- missing, truncated or foreign files;
- plans with unknown methods, unknown or mistyped hyper-parameters, or malformed rows;
- tensors that are missing, unexpected, of the wrong shape, of the wrong kind of dtype (an
  integer tensor where a float one belongs; float precisions are converted) or hold NaN/inf.

Not checked: the frozen base weights inside a full (not adapter-only) checkpoint are compared
by shape only, not scanned for NaN/inf.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_peft.adapters.base import get_adapter_class
from lightning_peft.policy import SPECIAL_METHODS, Plan, PlanRow, PolicyError, check_method_hparams
from lightning_peft.policy.schema import signature_types, type_error

ADAPTER_FILE = "adapters.safetensors"
PLAN_FILE = "plan.json"
PLAN_METADATA_KEY = "lightning_peft_plan"  # the plan inside the safetensors header (one atomic file)
MAX_LISTED = 6


class AdapterStateError(ValueError):
    """An adapter file or checkpoint that does not fit the live model, or cannot be trusted."""


# -- files ----------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """`torch.load` a checkpoint on the CPU with `weights_only=True`; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise AdapterStateError(f"Checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdapterStateError(
            f"{path}: refused to unpickle: it holds more than tensors and plain containers ({first}). "
            "If you trust this file, allow its types with torch.serialization.add_safe_globals"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise AdapterStateError(f"{path}: truncated or not a PyTorch checkpoint ({err})") from None
    if not isinstance(checkpoint, dict):
        raise AdapterStateError(f"{path}: not a Lightning checkpoint (a {type(checkpoint).__name__}, not a mapping)")
    return checkpoint


def read_adapter_dir(directory: str | Path) -> tuple[Plan, dict[str, Tensor]]:
    """Read and check an adapter directory without touching any model.

    The plan comes from the safetensors header (one file, written atomically); files written
    before the plan moved there carry it in `plan.json` next to the tensors, which is read then.
    """
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    tensor_path = directory / ADAPTER_FILE
    if not tensor_path.is_file():
        raise AdapterStateError(f"Adapter file {str(tensor_path)!r} is missing")
    try:
        with safe_open(tensor_path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterStateError(f"{tensor_path}: truncated or corrupted safetensors file ({err})") from None
    if PLAN_METADATA_KEY in metadata:
        plan_source, plan_text = f"{tensor_path} (header)", metadata[PLAN_METADATA_KEY]
    else:
        plan_path = directory / PLAN_FILE
        if not plan_path.is_file():
            raise AdapterStateError(f"{tensor_path} carries no plan and {str(plan_path)!r} is missing")
        plan_source, plan_text = str(plan_path), plan_path.read_bytes()
    plan = plan_from_json(plan_text, plan_source)
    expected = expected_adapter_state(plan, plan_source)
    full = tuple(f"{row.name}." for row in plan.rows if row.method == "full")
    adapter_part = {k: v for k, v in tensors.items() if not k.startswith(full)}  # `full` weights: checked live
    check_state(adapter_part, expected, str(tensor_path), exact_keys=True)
    return plan, tensors


# -- plans ----------------------------------------------------------------------------------


def plan_from_json(text: str | bytes, source: str) -> Plan:
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterStateError(f"{source}: not valid JSON ({err})") from None
    return plan_from_stored(data, source)


def plan_from_stored(data: Any, source: str) -> Plan:
    """A `Plan` from its stored mapping; every field type-checked, every method and hyper-parameter
    checked against the registry, errors naming `source` and the row."""
    fields = {f.name for f in dataclasses.fields(Plan)}
    if not isinstance(data, dict) or not fields <= set(data):
        raise AdapterStateError(f"{source}: not a lightning-peft plan (needs the keys {sorted(fields)})")
    if not isinstance(data["rows"], list):
        raise AdapterStateError(f"{source}: plan `rows` must be a list")
    rows = [_row_from_stored(raw, i, source) for i, raw in enumerate(data["rows"])]
    plan = Plan(rows, data["blocks_path"], data["num_blocks"], data["model_params"])
    _check_fields(plan, source, "plan", skip={"rows"})
    return plan


def _row_from_stored(raw: Any, index: int, source: str) -> PlanRow:
    names = [f.name for f in dataclasses.fields(PlanRow)]
    # fields with a default (a row's `optim`) may be absent: plans written before they existed
    required = {f.name for f in dataclasses.fields(PlanRow) if f.default is f.default_factory is dataclasses.MISSING}
    where = f"{source}: plan row {index}"
    if not isinstance(raw, dict) or set(raw) - set(names) or required - set(raw):
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise AdapterStateError(f"{where}: needs the keys {sorted(required)} (and may have {names}), got {keys}")
    row = PlanRow(**raw)
    where = f"{where} ({row.name!r})" if isinstance(row.name, str) else where
    _check_fields(row, where, "row")
    try:
        check_method_hparams(row.method, row.hparams)
    except PolicyError as err:
        raise AdapterStateError(f"{where}: {err}") from None
    return row


def _check_fields(obj: Any, where: str, what: str, skip: set[str] = frozenset()) -> None:
    hints = signature_types(type(obj))
    for f in dataclasses.fields(obj):
        error = None if f.name in skip else type_error(getattr(obj, f.name), hints.get(f.name, Any))
        if error is not None:
            raise AdapterStateError(f"{where}: {what} field `{f.name}` {error}")


def plans_differ(stored: Plan, live: Plan, what: str = "stored") -> str:
    """What differs between two plans (module, method, hyper-parameters), or `""`; `what` names the stored side."""
    a = {name: (method, hp) for name, method, hp in stored.fingerprint()}
    b = {name: (method, hp) for name, method, hp in live.fingerprint()}
    problems = [f"{n}: only in the {what} plan ({a[n][0]})" for n in sorted(set(a) - set(b))]
    problems += [f"{n}: only in the model ({b[n][0]})" for n in sorted(set(b) - set(a))]
    both = [n for n in sorted(set(a) & set(b)) if a[n] != b[n]]
    problems += [f"{n}: {what} {a[n][0]} {a[n][1]} vs model {b[n][0]} {b[n][1]}" for n in both]
    return "; ".join(problems[:MAX_LISTED]) + (" ..." if len(problems) > MAX_LISTED else "")


def expected_adapter_state(plan: Plan, source: str = "plan") -> dict[str, Tensor]:
    """The adapter tensors a plan needs, built on `meta` (shapes and dtypes, no memory).

    `full` rows are not listed: their tensors are the base module's own and are checked
    against the live model once it exists.
    """

    expected: dict[str, Tensor] = {}
    for i, row in enumerate(plan.rows):
        if row.method in SPECIAL_METHODS:
            continue
        try:
            with torch.device("meta"):
                adapter = get_adapter_class(row.method)(row.in_features, row.out_features, **row.hparams)
        except (ValueError, TypeError, RuntimeError, OverflowError) as err:
            raise AdapterStateError(f"{source}: plan row {i} ({row.name!r}): {err}") from None
        for key, value in adapter.state_dict().items():
            expected[f"{row.name}.adapter.{key}"] = value
    return expected


# -- tensors --------------------------------------------------------------------------------


def check_state(
    stored: Mapping[str, Any],
    live: Mapping[str, Tensor],
    source: str,
    required: set[str] | None = None,
    exact_keys: bool = False,
    scan: set[str] | None = None,
) -> None:
    """Raise naming `source` and each tensor of `stored` that does not fit `live`.

    Args:
        stored: the loaded tensors.
        live: reference tensors (live or `meta`): shape and dtype kind must agree.
        required: keys that must be present (default: every key of `live` when `exact_keys`).
        exact_keys: also refuse keys of `stored` that `live` does not have.
        scan: keys whose values must be finite (default: every stored key `live` has).
    """
    required = set(live) if required is None and exact_keys else (required or set())
    problems = [f"missing {_listed(sorted(required - set(stored)))}"] if required - set(stored) else []
    if exact_keys and set(stored) - set(live):
        problems.append(f"unexpected {_listed(sorted(set(stored) - set(live)))}")
    scan = set(stored) & set(live) if scan is None else scan
    for key in sorted(set(stored) & set(live)):
        problem = _tensor_problem(stored[key], live[key], check_finite=key in scan)
        if problem:
            problems.append(f"tensor {key!r} {problem}")
    if problems:
        raise AdapterStateError(f"{source}: stored state does not fit the model: " + "; ".join(problems[:MAX_LISTED]))


def _tensor_problem(value: Any, reference: Tensor, check_finite: bool) -> str | None:
    if not isinstance(value, Tensor):
        return f"is a {type(value).__name__}, not a tensor"
    if tuple(value.shape) != tuple(reference.shape):
        return f"has shape {tuple(value.shape)}, the model needs {tuple(reference.shape)}"
    if value.dtype != reference.dtype and _dtype_kind(value) != _dtype_kind(reference):
        return f"has dtype {value.dtype}, the model needs {reference.dtype}"
    if check_finite and (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
        return "holds NaN/inf"
    return None


def _dtype_kind(t: Tensor) -> str:
    return "complex" if t.is_complex() else "float" if t.is_floating_point() else str(t.dtype)


def _listed(keys: list[str]) -> str:
    return f"{keys[:MAX_LISTED]}{' ...' if len(keys) > MAX_LISTED else ''}"
