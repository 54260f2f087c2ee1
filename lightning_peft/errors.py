"""Errors every layer may raise about what a user handed in, so the command line can catch them by kind.

The `lightning-peft` command prints these as one line naming the file, field or rule at fault (no
traceback, no usage text) and exits with status 2. Each layer subclasses `InputError` with its own
type (`PolicyError`, `DataError`, ...); the CLI catches the base, so it imports no layer's errors.
"""


class InputError(ValueError):
    """Something the user gave (a file, a config field, a policy, an installed extra) cannot be used as is."""
