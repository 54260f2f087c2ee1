"""`AdapterCallback`: inject a policy's adapters into an unmodified LightningModule.

Where it acts, and why (reference/lightning.md §1, verified on Lightning 2.6):

- `setup` (every stage) runs before `configure_optimizers`, before the DDP/FSDP wrap and
  before a checkpoint is restored, so the user's optimizer sees only trainable tensors,
  DDP registers the adapters, and `ckpt_path=` finds adapter keys to load into. When the
  targeted layers do not exist yet (built in `LightningModule.setup`/`configure_model`),
  injection moves to right after the user's `configure_model`.
- Checkpoints carry the plan under `checkpoint["lightning_peft"]`; with
  `adapter_only_checkpoint` the `state_dict` keeps only trainable tensors (still resumable:
  optimizer, loops and callbacks are untouched, and loading is non-strict).
- Before any checkpoint weights are loaded, the stored plan and tensor shapes are compared
  with the live model, so a checkpoint from another policy never loads silently.
- `on_fit_start` stops the run when a trainable parameter is in no optimizer param group
  (an optimizer built too early trains nothing), and drops frozen tensors from the param
  groups, so `AdamW(self.parameters())` ends up holding exactly the adapters.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden

from .inject import (
    CHECKPOINT_KEY,
    AdapterStateError,
    atomic_write,
    check_checkpoint,
    find_adapters,
    get_plan,
    inject_adapters,
    merge_adapters,
    remove_adapters,
    save_adapters,
    trainable_state_keys,
)
from .optim_groups import apply_rule_settings
from .policy import LayerPolicy, Plan, PolicyError
from .stored import plan_from_stored, read_checkpoint


def print_plan(plan: Plan) -> None:
    """Print the plan as a rich table (rank zero only)."""
    from rich import get_console

    get_console().print(plan.table())
    get_console().print(plan.summary())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO`, but local files are written next to the target and renamed.

    Lightning stages a checkpoint in the system temp dir and moves it into place; across
    filesystems that move is a copy, which a crash can leave half-written at the final path.
    Here a crash during a save leaves the previous file intact, never a torn one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote stores: Lightning's own path
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def first_non_finite(module: torch.nn.Module, grads: bool) -> str | None:
    """Name of the first trainable parameter whose value (or gradient) holds NaN/inf, else `None`.

    One device sync for all tensors: the per-tensor checks are stacked before reading them.
    """
    named = [(n, p.grad if grads else p) for n, p in module.named_parameters() if p.requires_grad]
    named = [(n, t) for n, t in named if t is not None]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


def missing_from_optimizers(pl_module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[str]:
    """Names of trainable parameters that no optimizer param group holds."""
    held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    return [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in held]


class AdapterCallback(Callback):
    """Inject per-layer adapters following a policy; keep checkpoints small and safe.

    Args:
        policy: a `LayerPolicy`, a path to a policy YAML, or the same schema as a mapping.
        adapter_only_checkpoint: keep only trainable tensors in `.ckpt` files (resumable).
        merge_at_end: merge all adapters into the base weights when `fit` ends.
        export_dir: if set, write `adapters.safetensors` + `plan.json` there when `fit` ends.
        verbose: print the plan table on rank zero.
        check_finite: stop with an error naming the module when a trainable tensor's gradient is
            NaN/inf (before the optimizer step writes it into the weights), and refuse to save a
            checkpoint holding non-finite trainable weights.
    """

    def __init__(
        self,
        policy: str | dict | LayerPolicy,  # bare `dict` first: jsonargparse passes a mapping through unconverted
        adapter_only_checkpoint: bool = True,
        merge_at_end: bool = False,
        export_dir: str | None = None,
        verbose: bool = True,
        check_finite: bool = True,
    ) -> None:
        self.policy = LayerPolicy.load(policy)
        self.check_finite = check_finite
        self.adapter_only_checkpoint = adapter_only_checkpoint
        self.merge_at_end = merge_at_end
        self.export_dir = export_dir
        self.verbose = verbose
        self.plan: Plan | None = None

    # -- injection -----------------------------------------------------------------------

    def inject(self, pl_module: pl.LightningModule) -> Plan:
        """Inject (idempotently) and remember the plan; prints it once on rank zero."""
        already = get_plan(pl_module) is not None
        self.plan = inject_adapters(pl_module, self.policy)
        if any(layer.merged for _, layer in find_adapters(pl_module)):
            raise AdapterStateError("The model's adapters are merged; call unmerge_adapters() before training")
        if self.verbose and not already:
            rank_zero_only(print_plan)(self.plan)
        return self.plan

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._warn_about_trainer(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make it crash-safe
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        try:
            self.inject(pl_module)
        except PolicyError:
            # The targeted layers (or the whole block stack, for depth rules) may only be built in
            # `configure_model`: retry there; a policy that still does not fit raises the same error.
            if not is_overridden("configure_model", pl_module):
                raise
            self._inject_after_configure_model(pl_module)
        if self.adapter_only_checkpoint:
            pl_module.strict_loading = False
        self._guard_checkpoint_loading(pl_module)

    def _inject_after_configure_model(self, pl_module: pl.LightningModule) -> None:
        user_configure_model = pl_module.configure_model

        def configure_model_then_inject() -> None:  # a plain function: Lightning's is_overridden sees it
            user_configure_model()
            self.inject(pl_module)

        pl_module.configure_model = configure_model_then_inject

    def _guard_checkpoint_loading(self, pl_module: pl.LightningModule) -> None:
        """Validate checkpoints before Lightning loads their weights (module hook runs first)."""
        if getattr(pl_module, "_lightning_peft_guarded", False):
            return
        user_hook = pl_module.on_load_checkpoint

        def check_then_load(checkpoint: dict[str, Any]) -> None:
            source = getattr(pl_module.trainer, "ckpt_path", None) or "checkpoint"
            check_checkpoint(pl_module, checkpoint, source=str(source))
            user_hook(checkpoint)

        pl_module.on_load_checkpoint = check_then_load
        pl_module._lightning_peft_guarded = True

    def _warn_about_trainer(self, trainer: pl.Trainer) -> None:
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_weights_only and self.adapter_only_checkpoint:
                warnings.warn(
                    "ModelCheckpoint(save_weights_only=True) bypasses callbacks: its files hold the full model and "
                    "cannot resume. Use save_weights_only=False (adapter-only files stay small).",
                    stacklevel=2,
                )
        names = [type(cb).__name__ for cb in trainer.callbacks]
        for other in ("StochasticWeightAveraging", "WeightAveraging"):
            if other in names and names.index(other) < names.index(type(self).__name__):
                warnings.warn(f"{other} is listed before AdapterCallback; its model copy has no adapters", stacklevel=2)

    # -- fit -----------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refreshed = [
            f"{name} ({layer.method})"
            for name, layer in find_adapters(pl_module)
            if layer.adapter.refresh_from_base(layer)
        ]
        if refreshed:
            rank_zero_info(
                f"Adapter state derived from base weights (e.g. DoRA magnitudes) re-initialised in {len(refreshed)} "
                "module(s): their base weights changed after injection (loaded in setup?), e.g. "
                + ", ".join(refreshed[:3])
            )
        missing = missing_from_optimizers(pl_module, trainer.optimizers)
        if missing:
            raise RuntimeError(
                f"{len(missing)} trainable parameter(s) are in no optimizer param group, e.g. {missing[:4]}. "
                "The optimizer was built before the adapters were injected (in __init__, or by LightningCLI's "
                "automatic optimizer); build it in configure_optimizers from the module's parameters."
            )
        # `AdamW(self.parameters())` also holds the frozen base: keep only trainable tensors so the
        # optimizer (and its checkpointed state) sees the adapters alone. This runs before Lightning
        # restores optimizer state on resume, so saved and live param groups line up.
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p.requires_grad]
        self._apply_rule_optim(trainer, pl_module)

    def _apply_rule_optim(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Per-rule `optim` settings become param groups of the user's optimizer (`optim_groups.py`)."""
        plan = get_plan(pl_module)
        if plan is None:
            return
        names = [rule.name or rule.label(i) for i, rule in enumerate(self.policy.rules)]
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        lines = apply_rule_settings(trainer.optimizers, schedulers, pl_module, plan, names)
        if lines and self.verbose:
            rank_zero_info("Per-rule optimizer groups: " + "; ".join(lines))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.check_finite:
            bad = first_non_finite(pl_module, grads=True)
            if bad is not None:
                raise FloatingPointError(
                    f"Non-finite gradient in {bad} at step {trainer.global_step} (NaN/inf in the batch, or an "
                    "overflow); stopped before the optimizer step, so the weights and checkpoints are intact."
                )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir is not None and trainer.is_global_zero:
            save_adapters(pl_module, Path(self.export_dir))
        if self.merge_at_end:
            merge_adapters(pl_module)

    # -- checkpoints ---------------------------------------------------------------------

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        plan = get_plan(pl_module)
        if plan is None:
            return
        if self.check_finite:
            bad = first_non_finite(pl_module, grads=False)
            if bad is not None:
                raise FloatingPointError(f"Refusing to save a checkpoint: trainable tensor {bad} holds NaN/inf")
        checkpoint[CHECKPOINT_KEY] = {
            "plan": plan.to_dict(),
            "policy": self.policy.to_dict(),
            "adapter_only": self.adapter_only_checkpoint,
        }
        if self.adapter_only_checkpoint:
            keep = trainable_state_keys(pl_module)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def restore_from_checkpoint(model: torch.nn.Module, checkpoint: str | Path | dict[str, Any]) -> Plan:
    """Rebuild adapters from a checkpoint's stored plan and load its tensors, without a Trainer.

    For `load_from_checkpoint`-style inference: build the bare module, then call this. A file
    is read with `weights_only=True`; on any error the model is left as it was.
    """
    source = "checkpoint" if isinstance(checkpoint, dict) else str(checkpoint)
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    stored = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(stored, dict) or "plan" not in stored:
        raise AdapterStateError(f"{source}: holds no lightning-peft plan (was AdapterCallback used?)")
    plan = inject_adapters(model, plan_from_stored(stored["plan"], source))
    try:
        check_checkpoint(model, checkpoint, source)
    except AdapterStateError:
        remove_adapters(model)
        raise
    model.load_state_dict(checkpoint["state_dict"], strict=not stored.get("adapter_only", False))
    return plan
