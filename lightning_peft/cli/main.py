"""The `lightning-peft` command: LightningCLI plus `plan` (dry run) and `report`.

    lightning-peft plan   --config configs/uuid_hybrid.yaml   # which layer gets what; trains nothing
    lightning-peft fit    --config configs/uuid_hybrid.yaml   # train, log diagnostics, plot
    lightning-peft report runs/uuid_hybrid/version_0          # re-render a finished run's diagnostics
    lightning-peft export --config RUN/config.yaml --ckpt_path CKPT --out DIR   # peft folder (or --format merged)
    lightning-peft inspect PEFT_ADAPTER BASE_MODEL --out DIR  # diagnostics of a peft adapter trained elsewhere
    lightning-peft compare --config comparison.yaml           # variants side by side (experiments.compare)
    lightning-peft compare rank-search --config search.yaml   # the LoRA article's rank search (rank_search)
    lightning-peft suggest CONFIG --settings.budget N         # a per-layer policy from a pilot run (suggest)

Training subcommands (fit, validate, test, predict, plan, export) are `PeftCLI`'s
(`lightning_peft.experiments.peft_cli`); this module only dispatches.
"""

from __future__ import annotations

import pickle
import sys

from lightning_peft.callbacks.restart import RestartError
from lightning_peft.core.inject import AdapterStateError
from lightning_peft.diagnostics import render_report
from lightning_peft.errors import InputError
from lightning_peft.experiments.compare import compare_main
from lightning_peft.experiments.peft_cli import PeftCLI
from lightning_peft.experiments.rank_search import rank_search_main
from lightning_peft.experiments.suggest import suggest_main
from lightning_peft.interop.export import ExportError, diagnose_peft
from lightning_peft.interop.peft_format import PeftFormatError
from lightning_peft.policy import PolicyError


def report(log_dir: str) -> None:
    """Re-render the per-layer diagnostics table and figures of a finished run.

    Args:
        log_dir: the run's log directory (holding `update_diagnostics.csv`).
    """
    from rich import get_console

    get_console().print(render_report(log_dir))


def inspect(
    adapter: str, base: str, out: str = "peft_diagnostics", auto_class: str | None = None, plots: bool = True
) -> None:
    """Per-layer diagnostics of a peft LoRA/DoRA adapter trained elsewhere (update norms, ranks, DoRA drift).

    Args:
        adapter: the peft adapter folder (adapter_config.json + adapter_model.safetensors).
        base: local folder of its base model (a transformers save_pretrained folder).
        out: where update_diagnostics.csv and the figures go (`lightning-peft report OUT` re-renders them).
        auto_class: transformers Auto class for the base (default: from the adapter's task_type).
        plots: draw the PNG figures.
    """
    from rich import get_console

    diagnose_peft(adapter, base, out, auto_class)
    get_console().print(render_report(out, plots=plots))


def main(args: list[str] | None = None) -> None:
    """Console entry point (`lightning-peft`)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in ("report", "inspect"):
        from jsonargparse import auto_cli

        try:
            auto_cli(report if argv[0] == "report" else inspect, args=argv[1:])
        except (FileNotFoundError, NotADirectoryError, ValueError) as err:  # a missing or foreign folder
            print(f"lightning-peft {argv[0]}: error: {err}", file=sys.stderr)
            sys.exit(2)
        return
    if argv[:2] == ["compare", "rank-search"]:  # the LoRA article's rank search, a mode of compare
        sys.exit(rank_search_main(argv[2:]))
    if argv and argv[0] == "suggest":
        sys.exit(suggest_main(argv[1:]))
    if argv and argv[0] == "compare":
        sys.exit(compare_main(argv[1:]))
    try:
        PeftCLI(args=args)  # None: LightningCLI reads sys.argv itself
    except (
        PolicyError,
        AdapterStateError,
        ExportError,
        PeftFormatError,
        RestartError,
        InputError,
    ) as err:  # a message, not a traceback
        print(f"lightning-peft: error: {err}", file=sys.stderr)
        sys.exit(2)
    except pickle.UnpicklingError as err:  # LightningCLI reads --ckpt_path's hyper-parameters with weights_only=True
        print(
            f"lightning-peft: error: checkpoint refused by weights_only=True: {str(err).splitlines()[0]}",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
