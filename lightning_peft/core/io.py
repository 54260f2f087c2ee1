"""Crash-safe file writes: the project's one writer of files that must never be seen half written."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write via a temporary file in the same directory, fsync, then `os.replace`: never a torn file.

    The rename is atomic because source and target share a directory (and so a filesystem).
    The temporary file is created with mode 0666 minus the umask, as `open()` would create the
    target itself (0644 under the usual umask 022), so readers of the result are not locked out.
    """
    tmp = _new_temp_file(path)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0666 minus the umask, as created
    try:
        write(str(tmp))
        os.chmod(tmp, mode)  # writers that replace the file (safetensors does) create it 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _new_temp_file(path: Path) -> Path:
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
