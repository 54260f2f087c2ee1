"""The `lightning-peft` command: every subcommand, its one-line help, and one error wrapper.

    lightning-peft plan   --config configs/uuid_hybrid.yaml   # which layer gets what; trains nothing
    lightning-peft fit    --config configs/uuid_hybrid.yaml   # train, log diagnostics, plot
    lightning-peft report runs/uuid_hybrid/version_0          # re-render a finished run's diagnostics
    lightning-peft export --config RUN/config.yaml --ckpt_path CKPT --out DIR   # peft folder (or --format merged)
    lightning-peft inspect PEFT_ADAPTER BASE_MODEL --out DIR  # diagnostics of a peft adapter trained elsewhere
    lightning-peft compare --config comparison.yaml           # variants side by side (experiments.compare)
    lightning-peft compare rank-search --config search.yaml   # the LoRA article's rank search (rank_search)
    lightning-peft suggest CONFIG --settings.budget N         # a per-layer policy from a pilot run (suggest)

The training subcommands (fit, validate, test, predict, plan, export) are `PeftCLI`'s, a
LightningCLI (`lightning_peft.experiments.peft_cli`); the others are functions read by
jsonargparse's `auto_cli`. This module only dispatches: the command name picks the parser,
and a bad input of any command becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_peft.callbacks.restart import RestartError
from lightning_peft.core.inject import AdapterStateError
from lightning_peft.core.io import UnsafeWriteError
from lightning_peft.diagnostics import render_report
from lightning_peft.diagnostics.report import NotADiagnosticsTable
from lightning_peft.errors import InputError
from lightning_peft.experiments.compare import CompareError, compare
from lightning_peft.experiments.peft_cli import PeftCLI, PeftTrainer
from lightning_peft.experiments.policy_search import SearchError
from lightning_peft.experiments.rank_search import NoRankKept, RankSearchError, rank_search_command
from lightning_peft.experiments.suggest import SuggestError, suggest_command
from lightning_peft.interop.export import ExportError, diagnose_peft
from lightning_peft.interop.peft_format import PeftFormatError
from lightning_peft.policy import PolicyError
from lightning_peft.policy.schema import register_jsonargparse_loader

PROG = "lightning-peft"
DESCRIPTION = (
    "Per-layer hybrid adapters (LoRA, DoRA, MoRA, HiRA) for PyTorch Lightning. "
    f"Run `{PROG} COMMAND --help` for the options of a command."
)
FIGURES = "updates_*.png"  # the figures `report` draws (lightning_peft.diagnostics.draw_figures)
USER_ERRORS = (
    InputError,
    UnsafeWriteError,
    PolicyError,
    AdapterStateError,
    ExportError,
    PeftFormatError,
    RestartError,
    CompareError,
    RankSearchError,
    SuggestError,
    SearchError,
    FileNotFoundError,
    NotADirectoryError,
    NotADiagnosticsTable,
)
"""Bad input named by our own checks: printed as one line, never as a traceback."""


def report(log_dir: str) -> None:
    """Re-render the per-layer diagnostics table and figures of a finished run.

    Args:
        log_dir: the run's log directory (holding `update_diagnostics.csv`).
    """
    from rich import get_console

    folder = Path(log_dir) if Path(log_dir).is_dir() else Path(log_dir).parent
    before = {p.name for p in folder.glob(FIGURES)}
    console = get_console()
    console.print(render_report(log_dir))
    after = sorted(p.name for p in folder.glob(FIGURES))
    replaced = [name for name in after if name in before]
    note = f" (replacing the {len(replaced)} figure(s) drawn before)" if replaced else ""
    console.print(f"figures written to {folder}{note}: {', '.join(after)}", soft_wrap=True)


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
    get_console().print(f"diagnostics written to {out} (`{PROG} report {out}` re-renders them)", soft_wrap=True)


def _failed_variants(records: Any) -> int:
    """compare's exit code: 1 when a variant failed (the others ran and are recorded)."""
    failed = [r.name for r in records if r.status != "ok"]
    if failed:
        print(f"{PROG} compare: {len(failed)} variant(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


@dataclass(frozen=True)
class Command:
    """A subcommand that is a function: its arguments are its signature (jsonargparse `auto_cli`)."""

    function: Callable[..., Any]
    exit_code: Callable[[Any], int] = lambda result: 0
    epilog: str | None = None  # printed below the options by `--help`


COMMANDS = {
    "report": Command(report),
    "inspect": Command(inspect),
    "compare": Command(
        compare, _failed_variants, epilog=f"Also `{PROG} compare rank-search --help`: the LoRA article's rank search."
    ),
    "compare rank-search": Command(rank_search_command),
    "suggest": Command(suggest_command),
}
TRAINING = tuple(PeftCLI.subcommands())  # fit, validate, test, predict, plan, export


def _first_sentence(doc: str | None) -> str:
    text = " ".join((doc or "").split())
    return text.split(". ")[0].rstrip(".")


def command_lines() -> dict[str, str]:
    """Every command with its one-line help, in the order `--help` lists them."""
    lines = {name: _first_sentence(getattr(PeftTrainer, name).__doc__) for name in TRAINING}
    lines.update({name: _first_sentence(command.function.__doc__) for name, command in COMMANDS.items()})
    return lines


def command_parser():
    """The top-level parser: it lists the commands; each command's own parser reads its options."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=PROG, description=DESCRIPTION)
    commands = parser.add_subcommands(dest="command", title="commands", metavar="COMMAND")
    for name, line in command_lines().items():
        commands.add_subcommand(name, ArgumentParser(), help=line)
    return parser


def command_name(argv: list[str]) -> str | None:
    """The command `argv` starts with ("compare rank-search" counts as one), or None."""
    two = " ".join(argv[:2])
    if two in COMMANDS:
        return two
    if argv and (argv[0] in COMMANDS or argv[0] in TRAINING):
        return argv[0]
    return None


@contextlib.contextmanager
def user_errors(name: str) -> Iterator[None]:
    """Our named errors -> `lightning-peft NAME: error: ...` on stderr, exit code 2 (1: a search kept nothing)."""
    try:
        yield
    except USER_ERRORS as err:
        print(f"{PROG} {name}: error: {err}", file=sys.stderr)
        sys.exit(1 if isinstance(err, NoRankKept) else 2)
    except pickle.UnpicklingError as err:  # LightningCLI reads --ckpt_path's hyper-parameters with weights_only=True
        first_line = str(err).splitlines()[0]
        print(f"{PROG} {name}: error: checkpoint refused by weights_only=True: {first_line}", file=sys.stderr)
        sys.exit(2)


def main(args: list[str] | None = None) -> None:
    """Console entry point (`lightning-peft`)."""
    from jsonargparse import auto_cli

    argv = sys.argv[1:] if args is None else list(args)
    name = command_name(argv)
    if name is None:  # no command, --help, or an unknown one: the list of commands (and an error if any)
        parser = command_parser()
        if not argv:
            parser.print_help()
            sys.exit(2)
        parser.parse_args(argv)
        return
    with user_errors(name):
        if name in TRAINING:
            PeftCLI(args=args)  # None: LightningCLI reads sys.argv itself
            return
        command = COMMANDS[name]
        rest = argv[len(name.split()) :]
        result = auto_cli(
            command.function,
            args=rest,
            prog=f"{PROG} {name}",
            epilog=command.epilog,
            parser_mode=register_jsonargparse_loader(),  # YAML read as `fit` reads it (1.2, duplicate keys refused)
        )
    code = command.exit_code(result)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
