"""Variant names: each names a folder next to the files a comparison writes, on any file system.

Checked before anything trains, by every route that makes variants (`compare`, the rank
search, `suggest`), so a name that cannot be a folder never fails halfway through a run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lightning_peft.experiments.errors import CompareError

MAX_NAME_BYTES = 255  # the longest file name ext4, APFS, NTFS and tmpfs accept
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")
# compare, the rank search and suggest write files with these suffixes next to the variant folders
# (comparison.csv, metric_vs_params.png, rank_search.csv, chosen_policy.yaml, ...)
FILE_SUFFIXES = (".csv", ".png", ".yaml", ".yml", ".json")
# device names Windows reserves in every folder, with or without a suffix
RESERVED_STEMS = frozenset({"con", "prn", "aux", "nul", *(f"{p}{i}" for p in ("com", "lpt") for i in range(10))})


def name_problem(name: object) -> str | None:
    """Why `name` cannot name a variant's folder, or `None` when it can."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not NAME_PATTERN.fullmatch(name):
        return "must start with a letter or digit and hold only letters, digits and _.=+- (it names a directory)"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"is {len(name.encode())} bytes long; a folder name holds at most {MAX_NAME_BYTES}"
    if name.endswith("."):
        return "must not end with '.' (Windows drops it, so two names would share a folder)"
    if name.lower().endswith(FILE_SUFFIXES):
        return f"must not end in {', '.join(FILE_SUFFIXES)}: comparison files such as comparison.csv live there"
    if name.split(".")[0].lower() in RESERVED_STEMS:
        return f"is a device name Windows reserves ({name.split('.')[0].upper()}), not a folder name"
    return None


def check_variant_names(names: Sequence[object], what: str = "variant") -> None:
    """Refuse a name that cannot be a folder, and two names that would share one.

    Names are compared case-insensitively: on macOS and Windows `LoRA` and `lora` are one folder.
    """
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        problem = name_problem(name)
        if problem is not None:
            raise CompareError(f"{what} {i}: name {name!r} {problem}")
        key = str(name).casefold()
        if key in seen:
            first = names[seen[key]]
            same = f"duplicate name {name!r}" if first == name else f"name {name!r} differs from {first!r} only in case"
            raise CompareError(f"{what} {i}: {same} (also {what} {seen[key]}); each variant needs its own folder")
        seen[key] = i
