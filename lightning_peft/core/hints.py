"""How an error message tells the user which option to pass: in the CLI's syntax and in Python's.

The same checks run behind `lightning-peft export ...` and behind `export_peft(...)`, so a hint
names both spellings: `--overwrite true` (jsonargparse needs the value) and `overwrite=True`.
"""

from __future__ import annotations

from typing import Any


def option_hint(name: str, cli_value: str, python_value: Any, section: str = "") -> str:
    """`--section.name cli_value` (Python: `name=python_value!r`), e.g. option_hint("overwrite", "true", True).

    `section`: the config section the option sits in on the command line (`adapters` for
    `AdapterCallback`'s arguments: `--adapters.merge_at_end false`).
    """
    flag = f"{section}.{name}" if section else name
    return f"`--{flag} {cli_value}` (Python: `{name}={python_value!r}`)"
