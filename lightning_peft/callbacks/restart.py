"""Merge-and-restart training: ReLoRA (arXiv 2307.05695) and ReMoRA (arXiv 2405.12130, §5.3, App. B).

A rank-r update per cycle, summed over cycles, can reach a rank no single cycle can. Every
`every` optimizer steps `MergeRestart` folds each adapter's update into its base weight and
restarts the adapter from a zero update with the method's own rule (`AdapterMethod.restart`:
LoRA and HiRA re-draw A and zero B; DoRA also takes its magnitude from the merged rows; MoRA
zeroes M and moves to the next sharing type), then resets the optimizer state of the
re-initialised tensors (or prunes it by magnitude, as ReLoRA does). The jagged learning-rate
schedule that goes with it is `jagged_cosine_lambda` (the built-in tasks' `cosine_restarts`).

Where and why (docs/restart.md):

- The restart runs at the start of the first batch after step `k * every`, not at the end of
  step `k * every`: a checkpoint written at that step (ModelCheckpoint acts at batch end) holds
  the whole cycle, diagnostics measure the whole cycle, a run resumed from it restarts exactly
  where the uninterrupted run did, and no restart is wasted after the last step.
- Re-draws use a CPU generator seeded from `(seed, cycle, layer index)`: the same on every
  DDP rank and after a resume (Lightning does not restore RNG states).
- Merging is all or nothing: every merged weight is computed and checked finite before any
  layer changes (under FSDP2 on every rank: the ranks agree before any of them writes).
- Under FSDP2 (`ModelParallelStrategy`) each rank merges its own rows of each base weight
  (`AdapterMethod.merge_rows`), gathering only the small adapter factors; the re-draws are
  the same on every rank, each keeping its own rows; optimizer state is reset or pruned per
  shard (pruning's threshold is taken over the whole, adapter-sized, state tensor). FSDP1 and
  DeepSpeed shard flattened parameters, not rows: refused (`check_companions`).
- From the first restart on, the base weights of the adapted modules are trained state:
  checkpoints (adapter-only ones included) carry them, and record the cycle count.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_peft.adapters.base import AdapterLinear
from lightning_peft.callbacks.adapter import AdapterCallback
from lightning_peft.core.hints import option_hint
from lightning_peft.core.inject import AdapterStateError, find_adapters, model_restarts
from lightning_peft.core.sharding import any_rank, full_tensor, is_sharded, local_tensor
from lightning_peft.diagnostics import UpdateDiagnostics
from lightning_peft.policy import normalise_name

OptimizerReset = Literal["reset", "prune"]


class RestartError(ValueError):
    """A merge-and-restart setting that cannot work, raised before anything trains."""


# -- plain functions ------------------------------------------------------------------------


def check_restartable(model: nn.Module) -> list[tuple[str, AdapterLinear]]:
    """The adapted modules of `model`; raise naming any merged one or any method with no restart rule."""
    layers = find_adapters(model)
    if not layers:
        raise RestartError("MergeRestart found no adapters: add AdapterCallback (it injects them) to the Trainer")
    merged = [normalise_name(n) for n, layer in layers if layer.merged]
    if merged:
        raise RestartError(
            f"MergeRestart: {len(merged)} module(s) are merged (e.g. {merged[0]!r}), as merge_at_end leaves them; "
            "call unmerge_adapters(model) before training again"
        )
    no_rule = sorted({layer.method for _, layer in layers if not type(layer.adapter).can_restart()})
    if no_rule:
        where = next(normalise_name(n) for n, layer in layers if layer.method == no_rule[0])
        raise RestartError(
            f"MergeRestart: method(s) {no_rule} have no re-initialisation rule (AdapterMethod.restart), "
            f"e.g. module {where!r}; give those modules another method or train without MergeRestart"
        )
    no_rows = sorted({layer.method for _, layer in layers if not type(layer.adapter).can_merge_rows()})
    if no_rows and is_sharded(model):
        raise RestartError(
            f"MergeRestart under FSDP2: method(s) {no_rows} have no row-wise merge rule (AdapterMethod.merge_rows) "
            "for sharded base weights; give those modules another method, or train them with DDP"
        )
    return layers


def layer_generator(seed: int, cycle: int, index: int) -> torch.Generator:
    """The CPU generator for the re-draws of layer `index` at `cycle`: no state shared across layers or ranks."""
    return torch.Generator().manual_seed((seed * 1_000_003 + cycle * 10_007 + index) % (2**63 - 1))


@torch.no_grad()
def restart_adapters(model: nn.Module, cycle: int, seed: int = 0) -> list[nn.Parameter]:
    """Merge every adapter into its base weight and start cycle `cycle`; return the re-initialised parameters.

    All or nothing: each merged weight is computed and checked before any layer changes (one
    layer's weight of extra memory: the check pass discards, the merge pass recomputes).
    """
    layers = check_restartable(model)
    errors = [_merge_error(layer) for _, layer in layers]
    failed = any_rank([err is not None for err in errors], model)  # FSDP2: every rank checked only its rows
    for (name, _), err, bad in zip(layers, errors, failed, strict=True):
        if bad:
            why = err or "merging produced non-finite weights on another rank"
            raise AdapterStateError(f"Restart {cycle} at {normalise_name(name)!r}: {why}; no layer was merged")
    params: list[nn.Parameter] = []
    for index, (_, layer) in enumerate(layers):
        layer.merge_and_restart(cycle, layer_generator(seed, cycle, index))
        params.extend(p for p in layer.adapter.parameters() if p.requires_grad)
    return params


def _merge_error(layer: AdapterLinear) -> str | None:
    """Why `layer` cannot be merged now (None: it can); the merged weight is discarded."""
    try:
        layer.restart_weight()
    except ValueError as err:
        return str(err)
    return None


@torch.no_grad()
def reset_optimizer_state(
    optimizers: list[torch.optim.Optimizer],
    params: list[nn.Parameter],
    mode: OptimizerReset = "reset",
    prune_ratio: float = 0.9,
) -> None:
    """Forget the optimizer state of `params` (`reset`: the optimizer re-creates it, step 0),
    or zero the `prune_ratio` smallest-magnitude entries of each state tensor (`prune`, ReLoRA's
    magnitude pruning; scalar state such as Adam's step is kept)."""
    wanted = {id(p) for p in params}
    for optimizer in optimizers:
        for p in [p for p in optimizer.state if id(p) in wanted]:
            if mode == "reset":
                del optimizer.state[p]
                continue
            for value in optimizer.state[p].values():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and value.is_floating_point():
                    prune_smallest_(value, prune_ratio)


def prune_smallest_(tensor: torch.Tensor, ratio: float) -> None:
    """Zero the `ratio` share of entries with the smallest magnitude, in place.

    A sharded (FSDP2) state tensor: the threshold is taken over the whole tensor (adapter-sized,
    gathered), each rank zeroes its own block, so the result is the unsharded one.
    """
    k = int(ratio * tensor.numel())
    if k <= 0:
        return
    threshold = full_tensor(tensor).abs().flatten().kthvalue(k).values
    block = local_tensor(tensor)
    block.masked_fill_(block.abs() <= threshold, 0)


@torch.no_grad()
def snapshot_origins(model: nn.Module) -> None:
    """Keep a CPU copy of each adapted module's base weight as it is now: the reference of the
    cumulative diagnostics (taken before any restart, or just before a checkpoint loads).
    Under FSDP2 every rank keeps the whole weight (gathered: a collective), as diagnostics measure there."""
    for _, layer in find_adapters(model):
        layer.origin_weight = full_tensor(layer.base_weight().detach()).to("cpu", copy=True)


def jagged_cosine_lambda(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    restart_every: int | None,
    restart_warmup_steps: int,
    min_lr_ratio: float,
) -> float:
    """ReLoRA's jagged schedule: linear warm-up, one cosine decay to `min_lr_ratio` over
    `total_steps`, and after every `restart_every` steps a linear re-warm-up over
    `restart_warmup_steps` up to where the cosine has got to. `restart_every=None`: plain cosine."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)

    def cosine(at: int) -> float:
        progress = min(1.0, (at - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    if restart_every and step >= restart_every and step % restart_every < restart_warmup_steps:
        into = step % restart_every
        return into / restart_warmup_steps * cosine(step - into + restart_warmup_steps)
    return cosine(step)


class JaggedCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """`jagged_cosine_lambda` as a scheduler; step it every optimizer step (`interval: step`).

    `MergeRestart` checks that `restart_every` equals its own `every`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        restart_every: int | None = None,
        restart_warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        check_schedule_args(total_steps, warmup_steps, restart_every, restart_warmup_steps, min_lr_ratio)
        if total_steps < 1 or warmup_steps >= total_steps:
            raise RestartError(
                f"JaggedCosineLR: warmup_steps ({warmup_steps}) must be shorter than total_steps ({total_steps}), "
                "which must be positive: the cosine decays over the steps after the warm-up"
            )
        self.restart_every = restart_every
        schedule = functools.partial(
            jagged_cosine_lambda,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            restart_every=restart_every,
            restart_warmup_steps=restart_warmup_steps,
            min_lr_ratio=min_lr_ratio,
        )
        super().__init__(optimizer, schedule, last_epoch)


def check_schedule_args(
    total_steps: int, warmup_steps: int, restart_every: int | None, restart_warmup_steps: int, min_lr_ratio: float
) -> None:
    """Refuse a jagged schedule that cannot work, naming the argument."""
    for name, value in (("total_steps", total_steps), ("warmup_steps", warmup_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RestartError(f"{name} must be a non-negative integer, got {value!r}")
    bad_every = isinstance(restart_every, bool) or not isinstance(restart_every, int) or restart_every < 1
    if restart_every is not None and bad_every:
        raise RestartError(f"restart_every must be a positive integer or None, got {restart_every!r}")
    if isinstance(restart_warmup_steps, bool) or not isinstance(restart_warmup_steps, int) or restart_warmup_steps < 0:
        raise RestartError(f"restart_warmup_steps must be a non-negative integer, got {restart_warmup_steps!r}")
    if restart_every is not None and restart_warmup_steps >= restart_every:
        raise RestartError(
            f"restart_warmup_steps ({restart_warmup_steps}) must be shorter than restart_every ({restart_every})"
        )
    if not isinstance(min_lr_ratio, int | float) or isinstance(min_lr_ratio, bool) or not 0 <= min_lr_ratio <= 1:
        raise RestartError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")


def check_every(every: int, total_steps: float) -> None:
    """Refuse a cycle length that would never restart within the run."""
    if math.isfinite(total_steps) and every >= total_steps:
        raise RestartError(
            f"MergeRestart(every={every}) with a run of {int(total_steps)} optimizer steps never restarts "
            "(the first restart comes after step `every`); choose every < max_steps"
        )


# -- the callback ---------------------------------------------------------------------------


class MergeRestart(Callback):
    """Merge every adapter into its base weight every `every` optimizer steps and restart it (ReLoRA / ReMoRA).

    Use with `AdapterCallback` (any policy whose methods define a restart rule: LoRA, DoRA,
    MoRA, HiRA). With the built-in tasks, set `lr_schedule: cosine_restarts` and the same
    `restart_every` for ReLoRA's jagged schedule. docs/restart.md has the whole story.

    Args:
        every: restart after every this many optimizer steps (`T`).
        optimizer_reset: `reset` forgets the re-initialised tensors' optimizer state;
            `prune` zeroes its `prune_ratio` smallest entries (ReLoRA's magnitude pruning).
        prune_ratio: the share of state entries `prune` zeroes, in (0, 1).
        seed: seeds the re-draws (LoRA's A), per layer and cycle.
        track_cumulative: keep a CPU copy of the original base weights so that
            `UpdateDiagnostics` also measures the update summed over all cycles (only when
            an `UpdateDiagnostics` callback is in the Trainer).
    """

    def __init__(
        self,
        every: int,
        optimizer_reset: OptimizerReset = "reset",
        prune_ratio: float = 0.9,
        seed: int = 0,
        track_cumulative: bool = True,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise RestartError(f"MergeRestart(every=...) must be a positive integer of optimizer steps, got {every!r}")
        if optimizer_reset not in ("reset", "prune"):
            raise RestartError(f"MergeRestart(optimizer_reset=...) must be 'reset' or 'prune', got {optimizer_reset!r}")
        if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, int | float) or not 0 < prune_ratio < 1:
            raise RestartError(f"MergeRestart(prune_ratio=...) must be in (0, 1), got {prune_ratio!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RestartError(f"MergeRestart(seed=...) must be an integer, got {seed!r}")
        if not isinstance(track_cumulative, bool):
            raise RestartError(f"MergeRestart(track_cumulative=...) must be true or false, got {track_cumulative!r}")
        self.every = every
        self.optimizer_reset = optimizer_reset
        self.prune_ratio = float(prune_ratio)
        self.seed = seed
        self.track_cumulative = track_cumulative
        self.restarts = 0
        self._origin_hook: RemovableHandle | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_companions(trainer)
        if self._tracks(trainer):  # on resume the original weights exist only until the checkpoint loads
            self._remove_hook()

            # Every load overwrites the copy: the last one before fit is the checkpoint's.
            def keep_origins(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
                if prefix == "":
                    snapshot_origins(module)

            self._origin_hook = pl_module.register_load_state_dict_pre_hook(keep_origins)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hook()
        check_restartable(pl_module)
        check_every(self.every, trainer.estimated_stepping_batches)  # max_steps, or epochs x batches
        check_schedules(trainer, self.every)
        if model_restarts(pl_module) != self.restarts:
            raise RestartError(
                f"MergeRestart state says {self.restarts} restart(s) but the model's base weights hold "
                f"{model_restarts(pl_module)}: resume from a checkpoint written with both callbacks"
            )
        if self._tracks(trainer):
            if self.restarts and not all(layer.origin_weight is not None for _, layer in find_adapters(pl_module)):
                rank_zero_warn("MergeRestart: the original weights are unknown here; no cumulative diagnostics")
            elif not self.restarts:
                snapshot_origins(pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        due = step // self.every
        if step > 0 and step % self.every == 0 and self.restarts < due:
            params = restart_adapters(pl_module, due, self.seed)
            reset_optimizer_state(trainer.optimizers, params, self.optimizer_reset, self.prune_ratio)
            self.restarts = due
            rank_zero_info(f"MergeRestart: merged and restarted {len(find_adapters(pl_module))} modules at step {step}")
            for logger in trainer.loggers:  # a marker next to the loss curves (loggers write on rank zero)
                logger.log_metrics({"restart/cycle": float(due)}, step=step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()

    def _tracks(self, trainer: pl.Trainer) -> bool:
        """Keep the original weights only when asked and when `UpdateDiagnostics` will read them."""

        return self.track_cumulative and any(isinstance(cb, UpdateDiagnostics) for cb in trainer.callbacks)

    def _remove_hook(self) -> None:
        if self._origin_hook is not None:
            self._origin_hook.remove()
            self._origin_hook = None

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "seed": self.seed, "restarts": self.restarts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("every", "seed"):
            if state_dict.get(key) != getattr(self, key):
                raise RestartError(
                    f"The checkpoint was trained with MergeRestart({key}={state_dict.get(key)!r}), "
                    f"this run has {key}={getattr(self, key)!r}: resuming would change the cycles"
                )
        restarts = state_dict.get("restarts")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
            raise RestartError(f"MergeRestart state in the checkpoint has a bad restart count {restarts!r}")
        self.restarts = restarts


def check_companions(trainer: pl.Trainer) -> None:
    """Refuse other callbacks' settings that cannot work once base weights change during training."""

    strategy = type(trainer.strategy).__name__
    if strategy in ("FSDPStrategy", "DeepSpeedStrategy"):
        raise RestartError(
            f"MergeRestart does not support {strategy}: it shards flattened parameters, not rows of each weight, "
            "so a rank cannot merge its shard alone (and it is untested here); use ModelParallelStrategy (FSDP2, "
            "`fully_shard` in configure_model) or DDP"
        )
    for cb in trainer.callbacks:
        if not isinstance(cb, AdapterCallback):
            continue
        if cb.merge_at_end:
            raise RestartError(
                "MergeRestart with AdapterCallback(merge_at_end=True): the final merge would fold the last cycle "
                "into bases that checkpoints record as unmerged; set "
                f"{option_hint('merge_at_end', 'false', False, 'adapters')} and call merge_adapters(model) after fit"
            )
        if cb.export_dir is not None:
            raise RestartError(
                "MergeRestart with AdapterCallback(export_dir=...): adapter files are relative to the original "
                "base, which restarts change; export the merged model instead (`lightning-peft export`, export_merged)"
            )


def check_schedules(trainer: pl.Trainer, every: int) -> None:
    """A jagged schedule must restart with the merges, and be stepped every optimizer step."""
    for config in trainer.lr_scheduler_configs:
        restart_every = getattr(config.scheduler, "restart_every", None)
        if restart_every is None:
            continue
        if restart_every != every:
            raise RestartError(
                f"The learning-rate schedule re-warms every {restart_every} steps but MergeRestart(every={every}) "
                "merges on another period; set the same value (the task's restart_every)"
            )
        if config.interval != "step":
            raise RestartError("A jagged learning-rate schedule must be stepped every step (interval='step')")
