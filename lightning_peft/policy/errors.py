"""The policy layer's error and warning types, and the dataclass-field checks every settings class uses."""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any

from lightning_peft.policy.schema import signature_types, type_error


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
