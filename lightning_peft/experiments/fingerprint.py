"""What decides a variant's run, hashed, so a re-run skips only what would run the same again.

The fingerprint covers the base config's text, the overrides, the seed, and the contents of
every file they name: a policy YAML (`adapters.policy: policies/mine.yaml`), a nested config
(`model: model.yaml`), a preset name (its shipped text), and, recursively, whatever a named
YAML or JSON file names in turn. Editing the policy file a variant names therefore runs that
variant again, instead of skipping it as finished with the old policy's numbers.

A string is taken as a file when a file of that name exists, relative to the working directory
(as `LayerPolicy.load` reads it) or to the folder of the file that names it (as jsonargparse
reads nested configs). Files over `MAX_HASHED_BYTES` (data sets) count by size and modification
time; folders (a pretrained model) are not hashed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from lightning_peft.policy import list_presets, load_yaml, preset_text

MAX_HASHED_BYTES = 64 * 2**20
MAX_NESTED_FILES = 256  # a config naming more files than this is hashed by the first ones only
STRUCTURED_SUFFIXES = (".yaml", ".yml", ".json")


def fingerprint(config: str | Path, overrides: Mapping[str, Any], seed: int | None) -> str:
    """Hash of the config's text, the overrides, the seed and every file they name (16 hex digits)."""
    text = Path(config).read_text() + json.dumps(overrides, sort_keys=True, default=str) + repr(seed)
    digest = hashlib.sha256(text.encode())
    for line in referenced_contents(config, overrides):
        digest.update(line.encode())
    return digest.hexdigest()[:16]


def referenced_contents(config: str | Path, overrides: Mapping[str, Any]) -> list[str]:
    """`"<what>: <sha256>"` for every file and preset the config and the overrides name, in order."""
    config = Path(config)
    presets = set(list_presets())
    seen: set[Path] = {config.resolve()}
    lines: list[str] = []
    pending: list[tuple[Any, Path]] = [(_read_structured(config), config.parent), (dict(overrides), config.parent)]
    while pending and len(seen) <= MAX_NESTED_FILES:
        value, folder = pending.pop(0)
        for text in _strings(value):
            if text in presets and not Path(text).is_file():
                lines.append(f"preset {text}: {hashlib.sha256(preset_text(text).encode()).hexdigest()}")
                continue
            for path in _named_files(text, folder):
                if path in seen:
                    continue
                seen.add(path)
                lines.append(f"{path}: {_file_digest(path)}")
                if path.suffix.lower() in STRUCTURED_SUFFIXES and path.stat().st_size <= MAX_HASHED_BYTES:
                    pending.append((_read_structured(path), path.parent))
    return lines


def _strings(value: Any) -> Iterator[str]:
    """Every string value inside nested mappings and lists (keys are names, not files)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _named_files(text: str, folder: Path) -> list[Path]:
    """The existing files `text` names, relative to the working directory and to `folder`."""
    if not text or len(text) > 4096 or "\n" in text or "\0" in text:
        return []
    candidates = [Path(text)] if Path(text).is_absolute() else [Path(text), folder / text]
    found = []
    for candidate in candidates:
        try:
            if candidate.is_file():
                found.append(candidate.resolve())
        except OSError:  # a name too long for the file system is no file
            continue
    return list(dict.fromkeys(found))


def _file_digest(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > MAX_HASHED_BYTES:
        return f"size {stat.st_size}, modified {stat.st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_structured(path: Path) -> Any:
    """A YAML/JSON file's data (read as the project reads YAML), or `None` when it is not one."""
    try:
        return load_yaml(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, ValueError, OSError):  # not YAML (or unreadable): its bytes are still hashed
        return None
