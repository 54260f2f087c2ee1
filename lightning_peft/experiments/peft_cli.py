"""`PeftCLI`: LightningCLI with forced `adapters`/`diagnostics` sections and `plan`/`export` subcommands.

`adapters:` (an `AdapterCallback`) and `diagnostics:` (an `UpdateDiagnostics`) are forced
sections of every config, so one YAML describes model, data, policy and diagnostics.

Built on LightningCLI's public API only. Two defaults differ from a stock LightningCLI:

- `trainer.plugins` defaults to `AtomicCheckpointIO` (crash-safe checkpoint files); it shows
  in `--print_config` and a config's own `trainer.plugins` replaces it.
- An `optimizer:` / `lr_scheduler:` section is built inside `configure_optimizers`, from the
  parameters that are trainable then, i.e. after `AdapterCallback.setup` injected the
  adapters. A stock LightningCLI builds it before `fit`, over the base weights alone, and
  would train nothing (`AdapterCallback` stops such a run).

Experiments (compare, suggest, rank search) run configs through this class; the `lightning-peft`
entry point (`lightning_peft.cli`) wires it to the command line.
"""

from __future__ import annotations

import sys
from types import MethodType
from typing import Any, Literal

import lightning.pytorch as pl
from jsonargparse import Namespace
from jsonargparse.typing import register_type
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.utilities import rank_zero_warn

from lightning_peft.adapters.quantized import require_bitsandbytes
from lightning_peft.callbacks.adapter import AdapterCallback, print_plan
from lightning_peft.callbacks.checkpoint_io import AtomicCheckpointIO
from lightning_peft.callbacks.restart import JaggedCosineLR
from lightning_peft.diagnostics import UpdateDiagnostics
from lightning_peft.errors import InputError
from lightning_peft.interop.export import ExportError, export_checkpoint
from lightning_peft.policy import LayerPolicy
from lightning_peft.policy.schema import register_jsonargparse_loader

OPTIMIZER_KEY = "optimizer"


LR_SCHEDULER_KEY = "lr_scheduler"
REPLACED_KEYS = ("adapters.policy",)
"""Keys whose command-line value replaces the config's instead of merging into it: jsonargparse merges a
mapping into the mapping it overrides, so a policy named on the command line would inherit the rules
of the config's policy. A user who names a policy means this policy."""


def replace_not_merge(args: list[str]) -> list[str]:
    """Each `--adapters.policy VALUE` preceded by `--adapters.policy=replaced`, a plain string that the
    value then overrides from nothing (a mapping no longer merges into the config's mapping)."""
    flags = {f"--{key}" for key in REPLACED_KEYS}
    out = []
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in flags:
            out.append(f"{flag}=replaced")
        out.append(arg)
    return out


def _only_policy_objects(value: Any) -> LayerPolicy:
    """Parsing leaves paths and mappings to the other members of `AdapterCallback.policy`'s type."""
    if not isinstance(value, LayerPolicy):
        raise TypeError("not a LayerPolicy object")
    return value


class PeftTrainer(pl.Trainer):
    """A `Trainer` with the extra `plan` entry point that LightningCLI turns into a subcommand."""

    def plan(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None) -> None:
        """Dry run: build the model, resolve the adapter policy, print the plan; train nothing."""

    def export(
        self,
        model: pl.LightningModule,
        ckpt_path: str,
        out: str,
        datamodule: pl.LightningDataModule | None = None,
        format: Literal["peft", "merged"] = "peft",
        routes: dict[str, str] | None = None,
        svd_rank: int | None = None,
        svd_energy: float | None = None,
        submodule: str | None = None,
        save_base: bool = False,
        overwrite: bool = False,
        weights_only: bool | None = None,
    ) -> None:
        """Turn a finished run into a servable artifact: rebuild its adapters from a checkpoint, then export.

        Args:
            ckpt_path: the run's checkpoint (read with weights_only=True; its stored plan is injected).
            out: target folder (written via a temporary folder next to it, then renamed).
            format: `peft` (HF peft LoRA/DoRA adapter folder) or `merged` (transformers save_pretrained).
            routes: for peft, per method, `fold` (into base weights saved in out/base) or `svd`
                (convert to LoRA), e.g. `{mora: svd, full: fold}`; LoRA and DoRA need none.
            svd_rank: rank of the `svd` route.
            svd_energy: or the share of each update's squared Frobenius norm to keep, in (0, 1].
            submodule: attribute path of the Hugging Face model inside the LightningModule (default: its
                single PreTrainedModel child, e.g. `model`).
            save_base: also write the base model to out/base (for a base built from a config, not a hub).
            overwrite: replace a non-empty `out`.
            weights_only: accepted so a run's saved config.yaml parses; checkpoints are always read with
                weights_only=True (False is refused).
        """


def lazy_configure_optimizers(optimizer_init: dict[str, Any], lr_scheduler_init: dict[str, Any] | None) -> Any:
    """A `configure_optimizers` that builds the configured optimizer over the trainable parameters at call time."""

    def configure_optimizers(module: pl.LightningModule) -> Any:
        optimizer = instantiate_class([p for p in module.parameters() if p.requires_grad], optimizer_init)
        scheduler = instantiate_class(optimizer, lr_scheduler_init) if lr_scheduler_init else None
        if isinstance(scheduler, JaggedCosineLR):  # a per-step schedule (LightningCLI's default steps per epoch)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        return LightningCLI.configure_optimizers(module, optimizer, scheduler)

    return configure_optimizers


class PeftCLI(LightningCLI):
    """LightningCLI with forced `adapters`/`diagnostics` sections and a `plan` subcommand."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", PeftTrainer)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Crash-safe checkpoint files unless the caller sets plugins (compare passes its own callbacks here).
        atomic = {"plugins": {"class_path": f"lightning_peft.{AtomicCheckpointIO.__name__}"}}
        kwargs["trainer_defaults"] = {**atomic, **(kwargs.get("trainer_defaults") or {})}
        kwargs.setdefault(
            "parser_kwargs",
            {
                "prog": "lightning-peft",  # usage lines read `lightning-peft [options] fit`, whatever the script
                "description": "Per-layer hybrid adapters for Lightning (`lightning-peft --help` lists every command).",
            },
        )
        # The optimizer sections are added below and built lazily, not by LightningCLI before `fit`.
        kwargs["auto_configure_optimizers"] = False
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """As LightningCLI's, with `REPLACED_KEYS` replaced, not merged; and without its warning about `args`
        given while `sys.argv` has arguments: experiments (compare, suggest) run fits in-process on purpose
        while `sys.argv` holds their own command."""
        if isinstance(args, dict | Namespace):
            self.config = parser.parse_object(args)
            return
        self.config = parser.parse_args(replace_not_merge(sys.argv[1:] if args is None else list(args)))

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Every parser (main and subcommands) reads YAML as written: `"2:4"` stays a string,
        # duplicate keys are errors (see `lightning_peft.policy.schema`).
        kwargs.setdefault("parser_mode", register_jsonargparse_loader())
        # A `LayerPolicy` object (given in Python) is saved in config.yaml as its mapping, which reloads.
        register_type(LayerPolicy, serializer=LayerPolicy.to_dict, deserializer=_only_policy_objects)
        return super().init_parser(**kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands["plan"] = {"model", "datamodule"}
        commands["export"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(AdapterCallback, "adapters")
        parser.add_lightning_class_args(UpdateDiagnostics, "diagnostics")
        parser.add_optimizer_args(nested_key=OPTIMIZER_KEY)  # any torch optimizer, as in a stock LightningCLI
        parser.add_lr_scheduler_args(nested_key=LR_SCHEDULER_KEY)

    @property
    def section(self) -> Any:
        """The instantiated config of the running subcommand."""
        return self.config_init.get(str(self.subcommand), self.config_init)

    def before_instantiate_classes(self) -> None:
        """A quantized base without bitsandbytes: one line naming the extra (jsonargparse would bury it)."""
        section = self.config.get(str(self.subcommand), self.config)
        quantization = section.get("model.init_args.quantization") if "model.init_args" in section else None
        if quantization:
            require_bitsandbytes(quantization)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except InputError:  # a file or an extra to fix: one line from `main`, no usage text
            raise
        except ValueError as err:  # e.g. a PolicyError raised while building `adapters`
            self.parser.error(str(err))  # jsonargparse's usage + message, exit code 2, before any training

    def after_instantiate_classes(self) -> None:
        optimizer_init = self.section.get(OPTIMIZER_KEY)
        if not optimizer_init:
            return
        if type(self.model).configure_optimizers is not pl.LightningModule.configure_optimizers:
            rank_zero_warn(
                f"`{type(self.model).__name__}.configure_optimizers` is replaced by the config's `optimizer:` section"
            )
        scheduler_init = self.section.get(LR_SCHEDULER_KEY)
        fn = lazy_configure_optimizers(optimizer_init.as_dict(), scheduler_init.as_dict() if scheduler_init else None)
        self.model.configure_optimizers = MethodType(fn, self.model)  # as LightningCLI does for `optimizer:`

    def plan(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None) -> None:
        print_plan(self.section["adapters"].policy.resolve(model))

    def export(self, model: pl.LightningModule, datamodule: Any = None, **options: Any) -> None:
        from rich import get_console

        if options.pop("weights_only") is False:
            raise ExportError("export reads checkpoints with weights_only=True only; --weights_only false is refused")
        fmt = options.pop("format")
        ckpt_path, out = options.pop("ckpt_path"), options.pop("out")
        if fmt == "merged":
            extra = sorted(k for k in ("routes", "svd_rank", "svd_energy") if options[k] is not None)
            if extra or options["save_base"]:
                raise ExportError(f"--format merged folds every adapter; {extra or ['save_base']} apply to peft only")
            options = {k: options[k] for k in ("submodule", "overwrite")}
        options["protected"] = [str(p) for p in self.config[self.subcommand].get("config") or []]  # the run's config
        result = export_checkpoint(model, ckpt_path, out, format=fmt, **options)
        console = get_console()
        if fmt == "peft" and result.converted:
            console.print(result.table())
        console.print(f"exported {ckpt_path} as {fmt} to {out}")

    def after_fit(self) -> None:
        """Print the final metrics and the run folder (rank zero): the main job ends with its numbers and
        says where its files went."""
        if not self.trainer.is_global_zero:
            return
        from rich import get_console

        console = get_console()
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        if metrics:
            console.print(metrics_table(metrics, self.trainer.global_step))
        console.print(f"run folder: {self.trainer.log_dir or self.trainer.default_root_dir}", soft_wrap=True)


def metrics_table(metrics: dict[str, float], step: int) -> Any:
    """A rich table of final metrics, one row each."""
    from rich.table import Table

    table = Table(title=f"final metrics (step {step})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        table.add_row(key, f"{metrics[key]:.4f}")
    return table
