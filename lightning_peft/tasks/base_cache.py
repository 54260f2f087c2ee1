"""Bases the project trains itself (the UUID base, the prose base), cached on disk by a hash of their recipe.

A base is built once, deterministically, and saved with `save_pretrained` in
`$LIGHTNING_PEFT_CACHE/<kind>/<hash>` (default `~/.cache/lightning-peft/...`), the hash covering
everything that decides its weights (model config, data, seed, steps). The folder is written to a
temporary sibling and renamed into place, so a crash never leaves half a base, and processes that
start together each build and the first rename wins (the others drop their copy).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["BASE_RECORD", "base_cache_key", "cache_root", "cached_base"]

BASE_RECORD = "lightning_peft_base.json"


def cache_root(kind: str) -> Path:
    """`$LIGHTNING_PEFT_CACHE` or `~/.cache/lightning-peft`, plus `/<kind>`."""
    root = os.environ.get("LIGHTNING_PEFT_CACHE") or Path.home() / ".cache" / "lightning-peft"
    return Path(root) / kind


def base_cache_key(spec: dict[str, Any]) -> str:
    """A short hash of everything that decides the base's weights."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cached_base(
    root: str | Path,
    spec: dict[str, Any],
    build: Callable[[], tuple[torch.nn.Module, dict[str, Any]]],
    verbose: bool = True,
) -> Path:
    """The folder of the base `spec` describes under `root`, built by `build() -> (model, record)` if absent.

    `lightning_peft_base.json` in the folder holds `{"spec": spec, **record}` (how the build went).
    """
    folder = Path(root).expanduser() / base_cache_key(spec)
    if (folder / BASE_RECORD).is_file():
        return folder
    if verbose:
        print(f"lightning-peft: building a base (once, cached) -> {folder}", flush=True)
    start = time.perf_counter()
    model, record = build()
    record = {**record, "build_time_s": round(time.perf_counter() - start, 1)}  # what the first run paid
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        model.save_pretrained(tmp)
        (tmp / BASE_RECORD).write_text(json.dumps({"spec": spec, **record}, indent=2))
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / BASE_RECORD).is_file():  # not a concurrent writer that won the race
            raise
    if verbose:
        print(f"lightning-peft: base built: {record}", flush=True)
    return folder
