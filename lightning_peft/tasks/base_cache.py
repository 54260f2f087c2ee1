"""Bases the project trains itself (the UUID base, the prose base), cached on disk by a hash of their recipe.

A base is built once, deterministically, and saved with `save_pretrained` in
`$LIGHTNING_PEFT_CACHE/<kind>/<hash>` (default `~/.cache/lightning-peft/...`), the hash covering
everything that decides its weights (model config, data, seed, steps). The folder is written to a
temporary sibling and renamed into place, so a crash never leaves half a base; processes that start
together (every rank of every node, on a shared filesystem) build it once: one builds under a lock
file, the others wait for it (`lightning_peft.core.io.build_once`, docs/multinode.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_peft.core.io import build_once

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
    Built by one process however many start together (`build_once`): the others wait, then load it.
    """
    folder = Path(root).expanduser() / base_cache_key(spec)
    if (folder / BASE_RECORD).is_file():
        return folder

    def write(tmp: Path) -> None:
        if verbose:
            print(f"lightning-peft: building a base (once, cached) -> {folder}", flush=True)
        start = time.perf_counter()
        model, record = build()
        record = {**record, "build_time_s": round(time.perf_counter() - start, 1)}  # what the first run paid
        model.save_pretrained(tmp)
        (tmp / BASE_RECORD).write_text(json.dumps({"spec": spec, **record}, indent=2))
        if verbose:
            print(f"lightning-peft: base built: {record}", flush=True)

    return build_once(folder, write)
