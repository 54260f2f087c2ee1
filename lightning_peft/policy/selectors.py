"""Depth selectors: which repeated blocks a rule applies to."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from lightning_peft.policy.errors import PolicyError, check_fields, check_unknown_keys


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
        try:
            check_fields(self)
        except PolicyError as err:
            raise PolicyError(f"depth selector {err}") from None
        for name in ("first", "last", "outer", "inner"):
            k = getattr(self, name)
            if k is not None and k < (0 if name == "inner" else 1):
                raise PolicyError(f"Depth selector `{name}` must be a positive integer, got {k!r}")
        if self.fraction is not None:
            lo_hi = list(self.fraction)
            if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0:
                raise PolicyError(f"Depth selector `fraction` must be [lo, hi] with 0 <= lo < hi <= 1, got {lo_hi}")

    @classmethod
    def from_value(cls, value: Any) -> DepthSelector | None:
        """A selector from a mapping (unknown keys named), an existing selector, or `None`."""
        if isinstance(value, dict):
            check_unknown_keys(value, cls, "depth selector")
            return cls(**value)
        return value

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
