"""peft's module-name patterns, matched at a bounded cost: a pattern read from a file cannot hang us.

A peft `adapter_config.json` carries regexes (`target_modules` as a string, the keys of
`rank_pattern` and `alpha_pattern`). They are untrusted: `(a+)+b` against a long module name
backtracks for minutes under `re`. They are matched here with the `regex` package (same syntax
and semantics as `re` for valid patterns) and a per-match timeout, and every error names the
file and the field: an invalid pattern, or one too slow to match.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import regex

from lightning_peft.errors import InputError

MATCH_TIMEOUT_S = 0.25  # a module name is short: a legitimate pattern matches in microseconds


class PatternError(InputError):
    """A pattern from a file that is invalid or too costly to match; the message names the file and field."""


def compile_pattern(pattern: Any, where: str) -> regex.Pattern:
    """Compile `pattern` (from `where`, e.g. `"adapter_config.json: alpha_pattern key"`) or raise naming it."""
    if not isinstance(pattern, str):
        raise PatternError(f"{where} {pattern!r} must be a string (a regex)")
    try:
        return regex.compile(pattern)
    except (regex.error, OverflowError, RecursionError) as err:
        raise PatternError(f"{where} {pattern!r} is not a valid regex ({err})") from None


def _match(compiled: regex.Pattern, text: str, where: str, full: bool) -> bool:
    try:
        found = (compiled.fullmatch if full else compiled.match)(text, timeout=MATCH_TIMEOUT_S)
    except TimeoutError:
        raise PatternError(
            f"{where} {compiled.pattern!r} took over {MATCH_TIMEOUT_S} s to match {text!r} "
            "(catastrophic backtracking, e.g. nested quantifiers such as (a+)+); refused"
        ) from None
    return found is not None


def pattern_key(patterns: Mapping[str, Any], name: str, where: str) -> str | None:
    """peft's `get_pattern_key`: the first key matching `(.*\\.)?(<key>)$` against `name`, or `None`."""
    for key in patterns:
        compile_pattern(key, f"{where} key")
        if _match(regex.compile(rf"(.*\.)?({key})$"), name, f"{where} key", full=False):
            return key
    return None


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any, where: str = "pattern") -> Any:
    """The value of the first key of `patterns` matching `name` (peft's rule), else `default`."""
    key = pattern_key(patterns, name, where)
    return default if key is None else patterns[key]


def target_matches(target_modules: Any, name: str, where: str) -> bool:
    """peft's `check_target_module_exists` for `target_modules`: a string is a full-match regex, a
    list holds exact names or name suffixes after a dot."""
    if isinstance(target_modules, str):
        return _match(compile_pattern(target_modules, where), name, where, full=True)
    return name in target_modules or any(name.endswith(f".{t}") for t in target_modules)
