"""Crash-safe file writes: the project's one writer of files that must never be seen half written,
and of caches that several processes (ranks, nodes on a shared filesystem) may ask for at once."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: builds are still atomic, but may run more than once
    fcntl = None  # type: ignore[assignment]


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


def build_once(path: Path, build: Callable[[Path], object]) -> Path:
    """Make `path` (a file or a folder) exist, built by one process however many ask at once.

    `build(tmp)` writes the result at `tmp`, a fresh path in the same directory, which is then
    renamed to `path`: a crash never leaves half a result, and a present `path` is complete.
    The first process to take the lock file `.<name>.lock` next to `path` builds; the others
    wait on the lock and then find `path` built (on a shared filesystem with POSIX locks, the
    same holds across nodes). A failed build raises in the process that ran it and releases the
    lock: a waiting process then tries once itself.
    """
    path = Path(path).expanduser()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent / f".{path.name}.lock"):
        if path.exists():  # built by the process that held the lock before us
            return path
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            build(tmp)
            if not tmp.exists():
                raise FileNotFoundError(f"build_once: the builder of {path} wrote nothing at the path it was given")
            os.replace(tmp, path)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()
    return path


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive `flock` on `lock_path`, held for the block (released by the OS if the process dies)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
