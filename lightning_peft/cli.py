"""The `lightning-peft` command: LightningCLI plus `plan` (dry run) and `report`.

    lightning-peft plan   --config configs/uuid_hybrid.yaml   # which layer gets what; trains nothing
    lightning-peft fit    --config configs/uuid_hybrid.yaml   # train, log diagnostics, plot
    lightning-peft report runs/uuid_hybrid/version_0          # re-render a finished run's diagnostics
    lightning-peft compare --config comparison.yaml           # variants side by side (lightning_peft.compare)
    lightning-peft compare rank-search --config search.yaml   # the LoRA article's rank search (rank_search)
    lightning-peft suggest CONFIG --settings.budget N         # a per-layer policy from a pilot run (suggest)

`adapters:` (an `AdapterCallback`) and `diagnostics:` (an `UpdateDiagnostics`) are forced
sections of every config, so one YAML describes model, data, policy and diagnostics.

Adapters are injected right after the model is instantiated, *before* LightningCLI builds
its automatic optimizer (`optimizer:` in a config), which would otherwise hold no adapter
parameters and train nothing (reference/lightning.md §4.5).
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .callback import AdapterCallback, print_plan
from .diagnostics import UpdateDiagnostics
from .inject import AdapterStateError
from .policy import PolicyError
from .schema import register_jsonargparse_loader


class PeftTrainer(pl.Trainer):
    """A `Trainer` with the extra `plan` entry point that LightningCLI turns into a subcommand."""

    def plan(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None) -> None:
        """Dry run: build the model, resolve the adapter policy, print the plan; train nothing."""


class PeftCLI(LightningCLI):
    """LightningCLI with forced `adapters`/`diagnostics` sections and a `plan` subcommand."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", PeftTrainer)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault(
            "parser_kwargs",
            {"description": "Per-layer hybrid adapters for Lightning. Also: `lightning-peft report LOG_DIR`, "
            "`lightning-peft compare --config COMPARISON`."},
        )
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Every parser (main and subcommands) reads YAML as written: `"2:4"` stays a string,
        # duplicate keys are errors (see `lightning_peft.schema`).
        kwargs.setdefault("parser_mode", register_jsonargparse_loader())
        return super().init_parser(**kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands["plan"] = {"model", "datamodule"}
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(AdapterCallback, "adapters")
        parser.add_lightning_class_args(UpdateDiagnostics, "diagnostics")

    def instantiate_classes(self) -> None:
        # Same steps as LightningCLI.instantiate_classes, with injection before the optimizer.
        try:
            self.config_init = self.parser.instantiate_classes(self.config)
        except ValueError as err:  # e.g. a PolicyError raised while building `adapters`
            self.parser.error(str(err))  # jsonargparse's usage + message, exit code 2, before any training
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        if self.subcommand != "plan":
            self._get(self.config_init, "adapters").inject(self.model)
        self._add_configure_optimizers_method_to_model(self.subcommand)
        self.trainer = self.instantiate_trainer()

    def plan(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None) -> None:
        callback = self._get(self.config_init, "adapters")
        print_plan(callback.policy.resolve(model))

    def after_fit(self) -> None:
        """Print the final metrics (rank zero) so the main job ends with its numbers."""
        if not self.trainer.is_global_zero:
            return
        from rich import get_console
        from rich.table import Table

        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        if not metrics:
            return
        table = Table(title=f"final metrics (step {self.trainer.global_step})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in sorted(metrics):
            table.add_row(key, f"{metrics[key]:.4f}")
        get_console().print(table)


def report(log_dir: str) -> None:
    """Re-render the per-layer diagnostics table and figures of a finished run.

    Args:
        log_dir: the run's log directory (holding `update_diagnostics.csv`).
    """
    from rich import get_console

    from .diagnostics import render_report

    get_console().print(render_report(log_dir))


def main(args: list[str] | None = None) -> None:
    """Console entry point (`lightning-peft`)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "report":
        from jsonargparse import CLI

        try:
            CLI(report, args=argv[1:])
        except (FileNotFoundError, NotADirectoryError, ValueError) as err:  # a missing or foreign folder
            print(f"lightning-peft report: error: {err}", file=sys.stderr)
            sys.exit(2)
        return
    if argv[:2] == ["compare", "rank-search"]:  # the LoRA article's rank search, a mode of compare
        from .rank_search import rank_search_main

        sys.exit(rank_search_main(argv[2:]))
    if argv and argv[0] == "suggest":
        from .suggest import suggest_main

        sys.exit(suggest_main(argv[1:]))
    if argv and argv[0] == "compare":
        from .compare import compare_main

        sys.exit(compare_main(argv[1:]))
    try:
        PeftCLI(args=args)  # None: LightningCLI reads sys.argv itself
    except (PolicyError, AdapterStateError) as err:  # bad policy / adapter state: a message, not a traceback
        print(f"lightning-peft: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
