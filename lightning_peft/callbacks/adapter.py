"""`AdapterCallback`: inject a policy's adapters into an unmodified LightningModule.

It works through Lightning's public hooks only and never replaces a method of the user's
module. Where it acts, and why (Lightning 2.6 hook order; see docs/policies.md):

- `setup` (every stage) runs before `configure_optimizers`, before the DDP/FSDP wrap and
  before a checkpoint is restored, so the user's optimizer sees only trainable tensors,
  DDP registers the adapters, and `ckpt_path=` finds adapter keys to load into.
- Layers built in `LightningModule.configure_model` do not exist yet at `Callback.setup`,
  and a callback has no hook after `configure_model`. The callback then calls
  `configure_model()` itself, inside the same strategy and precision contexts Lightning
  uses, and injects. Lightning requires that hook to be idempotent ("after the first time
  the hook is called, subsequent calls to it should be a no-op"), so its own later call
  changes nothing; Lightning's `WeightAveraging` callback builds layers the same way.
- Checkpoints: `on_save_checkpoint` stores the plan under `checkpoint["lightning_peft"]`
  (a fixed key, so `restore_from_checkpoint` finds it without a Trainer) and, with
  `adapter_only_checkpoint`, keeps only trainable tensors (loading is then non-strict via
  the public `LightningModule.strict_loading`).
- Lightning loads a checkpoint's weights before any callback hook sees the checkpoint.
  So that a checkpoint whose tensors do not fit never loads partly, the callback registers
  a `load_state_dict` pre-hook on the module (torch's public
  `Module.register_load_state_dict_pre_hook`, removed at teardown): it checks names and
  shapes before a single tensor is copied. The stored plan (methods, hyper-parameters) is
  compared in `on_load_checkpoint`, after the weights but before anything trains.
- `on_fit_start` stops the run when a trainable parameter is in no optimizer param group
  (an optimizer built too early trains nothing), and drops frozen tensors from the param
  groups, so `AdamW(self.parameters())` ends up holding exactly the adapters.

Crash-safe checkpoint files are a separate, explicit choice: pass
`Trainer(plugins=[AtomicCheckpointIO()])` (the `lightning-peft` command does).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.hooks import RemovableHandle

from lightning_peft.callbacks.optim_groups import apply_rule_settings, check_resumed_rule_settings
from lightning_peft.core.hints import option_hint
from lightning_peft.core.inject import (
    CHECKPOINT_KEY,
    AdapterStateError,
    base_weight_keys,
    check_checkpoint,
    check_checkpoint_plan,
    find_adapters,
    get_plan,
    inject_adapters,
    merge_adapters,
    model_restarts,
    remove_adapters,
    save_adapters,
    set_restarts,
    stored_restarts,
    trainable_state_keys,
)
from lightning_peft.core.stored import check_state, plan_from_stored, read_checkpoint
from lightning_peft.policy import LayerPolicy, Plan, PolicyError


def print_plan(plan: Plan) -> None:
    """Print the plan as a rich table (rank zero only)."""
    from rich import get_console

    get_console().print(plan.table())
    get_console().print(plan.summary())


def check_before_load(module: torch.nn.Module, state: dict[str, Any], source: str) -> None:
    """Raise if `state` lacks a trainable tensor of `module`, or holds one that does not fit (shape, dtype, NaN).

    The tensor half of `check_checkpoint`, for the `load_state_dict` pre-hook, which sees the
    state dict but not the rest of the checkpoint.
    """
    if get_plan(module) is None:
        return
    required = trainable_state_keys(module)
    scan = (required | base_weight_keys(module)) & set(state)  # merged restart cycles travel in base weights
    check_state(state, module.state_dict(), source, required=required, scan=scan)


def check_checkpoint_strategy(strategy: Any, adapter_only: bool) -> None:
    """Refuse, before anything trains, a checkpoint layout that could not resume.

    Under FSDP2 (`ModelParallelStrategy`) Lightning writes a sharded distributed checkpoint
    by default and, on resume, requires every key of the model in it; an adapter-only
    checkpoint leaves the frozen weights out. Adapter-only checkpoints under FSDP2 are
    therefore gathered single files (`save_distributed_checkpoint=False`): small, resumable
    under FSDP2, and readable in one process (`restore_from_checkpoint`). Checked at setup when
    a `ModelCheckpoint` will write, and again before any save. See README, "Distributed".
    """
    if not adapter_only or type(strategy).__name__ != "ModelParallelStrategy":
        return
    if getattr(strategy, "_save_distributed_checkpoint", False):  # no public accessor in Lightning 2.6
        raise AdapterStateError(
            "AdapterCallback(adapter_only_checkpoint=True) under ModelParallelStrategy needs "
            "ModelParallelStrategy(save_distributed_checkpoint=False): Lightning cannot resume an adapter-only "
            f"sharded checkpoint. Or set {option_hint('adapter_only_checkpoint', 'false', False, 'adapters')} to "
            "keep full sharded checkpoints."
        )


def build_layers_in_configure_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Call the module's own `configure_model` now, in the contexts Lightning calls it in.

    Returns `False` when the module does not override the hook (nothing to build).
    """
    if type(pl_module).configure_model is pl.LightningModule.configure_model:
        return False
    with (
        trainer.strategy.tensor_init_context(),
        trainer.strategy.model_sharded_context(),
        trainer.precision_plugin.module_init_context(),
    ):
        pl_module.configure_model()
    return True


def _checkpoint_source(trainer: pl.Trainer) -> str:
    """How errors name the checkpoint being loaded (`trainer.ckpt_path` is set once loading starts)."""
    return str(trainer.ckpt_path or "checkpoint")


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
    """Inject per-layer adapters following a policy; keep checkpoints small and checked.

    Args:
        policy: a `LayerPolicy`, a preset name, a path to a policy YAML, or the same schema as a mapping.
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
        self._load_guard: RemovableHandle | None = None

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
        if trainer.checkpoint_callbacks:  # checkpoints will be written: refuse a layout that cannot resume now
            check_checkpoint_strategy(trainer.strategy, self.adapter_only_checkpoint)
        try:
            self.inject(pl_module)
        except PolicyError:
            # The targeted layers (or the block stack, for depth rules) may only be built in
            # `configure_model`: build them now and retry; a policy that still does not fit raises.
            if not build_layers_in_configure_model(trainer, pl_module):
                raise
            self.inject(pl_module)
        if self.adapter_only_checkpoint:
            pl_module.strict_loading = False
        self._remove_load_guard()

        def check_before_loading(module: torch.nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
            if prefix == "":  # a wrapper's load (FSDP) renames keys: `on_load_checkpoint` checks those
                check_before_load(module, state, _checkpoint_source(trainer))

        self._load_guard = pl_module.register_load_state_dict_pre_hook(check_before_loading)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_load_guard()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_load_guard()

    def _remove_load_guard(self) -> None:
        if self._load_guard is not None:
            self._load_guard.remove()
            self._load_guard = None

    def _warn_about_trainer(self, trainer: pl.Trainer) -> None:
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_weights_only and self.adapter_only_checkpoint:
                warnings.warn(
                    "ModelCheckpoint(save_weights_only=True) bypasses callbacks: its files hold the full model and "
                    "cannot resume. Give it `save_weights_only: false` (its init_args in a config; Python: "
                    "`ModelCheckpoint(save_weights_only=False)`); adapter-only files stay small.",
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
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        lines = apply_rule_settings(trainer.optimizers, schedulers, pl_module, plan, self._rule_names())
        if lines and self.verbose:
            rank_zero_info("Per-rule optimizer groups: " + "; ".join(lines))

    def _rule_names(self) -> list[str]:
        return [rule.name or rule.label(i) for i, rule in enumerate(self.policy.rules)]

    def _check_resumed_optim(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """A resumed fit gets the checkpoint's param groups: refuse one whose rules' `optim` changed since."""
        live, stored = get_plan(pl_module), checkpoint.get(CHECKPOINT_KEY)
        if live is None or not isinstance(stored, dict) or trainer.state.fn != "fit":
            return
        if "state_dict" in checkpoint and not checkpoint.get("optimizer_states"):
            return  # a weights-only checkpoint: the optimizer starts fresh, with the new settings
        source = _checkpoint_source(trainer)
        check_resumed_rule_settings(plan_from_stored(stored["plan"], source), live, source, self._rule_names())

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
        check_checkpoint_strategy(trainer.strategy, self.adapter_only_checkpoint)  # a manual save: nothing written
        if self.check_finite:
            bad = first_non_finite(pl_module, grads=False)
            if bad is not None:
                raise FloatingPointError(f"Refusing to save a checkpoint: trainable tensor {bad} holds NaN/inf")
        checkpoint[CHECKPOINT_KEY] = {
            "plan": plan.to_dict(),
            "policy": self.policy.to_dict(),
            "adapter_only": self.adapter_only_checkpoint,
            "restarts": model_restarts(pl_module),  # merge-and-restart cycles held by the base weights
        }
        if self.adapter_only_checkpoint:
            keep = trainable_state_keys(pl_module)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if "state_dict" not in checkpoint and trainer.strategy.restore_checkpoint_after_setup:
            # FSDP2 (ModelParallelStrategy) loads the weights itself, through the module's
            # `load_state_dict` (so the pre-hook checked them), and hands callbacks the rest.
            check_checkpoint_plan(pl_module, checkpoint, _checkpoint_source(trainer))
            set_restarts(pl_module, stored_restarts(checkpoint, _checkpoint_source(trainer)))
            self._check_resumed_optim(trainer, pl_module, checkpoint)
            return
        check_checkpoint(pl_module, checkpoint, _checkpoint_source(trainer))
        self._check_resumed_optim(trainer, pl_module, checkpoint)
        set_restarts(pl_module, stored_restarts(checkpoint, _checkpoint_source(trainer)))


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
    set_restarts(model, stored_restarts(checkpoint, source))
    return plan
