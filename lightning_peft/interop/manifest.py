"""Which adapter folders a folder holds: an export's manifest, or peft's own layouts. Names stay inside.

Three layouts are read:

- one peft adapter: `adapter_config.json` at the folder itself;
- an `export_peft` folder: `lightning_peft_export.json` names its adapters (`.` or subfolders)
  and the saved base;
- peft's `save_pretrained` of a model with several adapters: the `default` adapter at the
  folder itself (if there is one) and every other adapter in a subfolder named after it.

A name read from a manifest is untrusted: an absolute path, a `..`, or a symlink whose target
lies outside the folder is refused, naming the manifest and the field, before anything is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_peft.interop.peft_format import PEFT_CONFIG_FILE, PeftFormatError

MANIFEST_FILE = "lightning_peft_export.json"


def inside(folder: Path, name: Any, where: str) -> Path:
    """`folder / name` for a relative `name` that stays inside `folder`, symlinks resolved; else a named error."""
    if not isinstance(name, str) or not name:
        raise PeftFormatError(f"{where}: {name!r} must be a non-empty relative path")
    path = Path(name)
    if path.is_absolute() or ".." in path.parts:
        raise PeftFormatError(f"{where}: {name!r} must be a relative path inside {folder} (no absolute path, no '..')")
    resolved = (folder / path).resolve()
    if resolved != folder.resolve() and folder.resolve() not in resolved.parents:
        raise PeftFormatError(f"{where}: {name!r} leads outside {folder} (a symlink to {resolved}); refused")
    return folder / path


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The export manifest of `folder`, with its `adapters` names and `base` checked to stay inside it."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise PeftFormatError(f"{path}: not a readable export manifest ({err})") from None
    adapters = manifest.get("adapters") if isinstance(manifest, dict) else None
    if not isinstance(adapters, dict) or not adapters:
        raise PeftFormatError(f"{path}: `adapters` must be a non-empty mapping of adapter folder -> modules")
    for name in adapters:
        if not inside(folder, name, f"{path}: adapters").is_dir():
            raise PeftFormatError(f"{path}: adapters: {name!r} is not a folder inside {folder}")
    if manifest.get("base") is not None:
        inside(folder, manifest["base"], f"{path}: base")
    return manifest


def adapter_folders(folder: str | Path) -> list[Path]:
    """Every adapter folder `folder` holds, in the layouts above; a named error when it holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PeftFormatError(f"{folder} is not a folder")
    if (folder / MANIFEST_FILE).is_file():
        return [folder if name == "." else folder / name for name in read_manifest(folder)["adapters"]]
    found = [folder] if (folder / PEFT_CONFIG_FILE).is_file() else []
    for child in sorted(p for p in folder.iterdir() if (p / PEFT_CONFIG_FILE).is_file()):
        found.append(inside(folder, child.name, f"{folder}: adapter subfolder"))
    if not found:
        raise PeftFormatError(f"{folder / PEFT_CONFIG_FILE} is missing: {folder} is not a peft adapter folder")
    return found
