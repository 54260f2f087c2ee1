"""How an error message tells the user which option to pass: in the CLI's syntax and in Python's.

The same checks run behind `lightning-peft export ...` and behind `export_peft(...)`, so a hint
names both spellings: `--overwrite true` (jsonargparse needs the value) and `overwrite=True`.
"""

from __future__ import annotations

from typing import Any


def option_hint(name: str, cli_value: str, python_value: Any) -> str:
    """`--name cli_value` (Python: `name=python_value!r`), e.g. option_hint("overwrite", "true", True)."""
    return f"`--{name} {cli_value}` (Python: `{name}={python_value!r}`)"
