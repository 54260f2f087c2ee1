"""Crash-safe writes, and the one rule for writing over what exists (docs/hostile_input.md).

`atomic_write` never leaves a file half written; `check_replaceable` decides whether a path
may be written over at all: only what the tool itself wrote (its marker proves it), never the
working directory, never a folder holding the source of the write, never through a symlink.
`build_once` builds a cache that several processes (ranks, nodes on a shared filesystem) may
ask for at once exactly once, never seen half built.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: builds are still atomic, but may run more than once
    fcntl = None  # type: ignore[assignment]

from lightning_peft.core.hints import option_hint
from lightning_peft.errors import InputError


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


@contextlib.contextmanager
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


# -- replacing what exists: one rule for every writer --------------------------------------


class UnsafeWriteError(InputError):
    """A write refused because it could destroy something lightning-peft did not write (one-line reason)."""


def check_replaceable(
    target: str | Path, marker: str, protected: Iterable[str | Path] = (), overwrite: bool = True
) -> Path:
    """The one rule for writing `target` (a folder, or a file) over whatever is there.

    Refused, with a one-line reason: a symlinked target; the working directory or a folder
    holding it; a target that is, or holds, a `protected` path (the checkpoint being exported,
    the run's config); an existing file where a folder goes, or the reverse; and anything
    existing that the tool cannot prove it wrote: a non-empty folder without the file `marker`
    inside it, or a file without the file `marker` beside it. A proven one is replaced only
    when `overwrite`. A missing target, or an empty folder, is always fine.
    """
    target = Path(target)
    if target.is_symlink():
        raise UnsafeWriteError(f"{str(target)!r} is a symlink; give the real path ({target.resolve()})")
    real = target.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise UnsafeWriteError(f"{str(target)!r} is the working directory (or holds it); write to a new folder")
    for path in protected:
        source = Path(path).resolve()
        if source == real or real in source.parents:
            raise UnsafeWriteError(f"{str(target)!r} holds {str(path)!r}, the source of this write; choose another")
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return target
    proof = target / marker if target.is_dir() else target.parent / marker
    if not proof.is_file():
        raise UnsafeWriteError(
            f"{str(target)!r} exists and was not written by lightning-peft (no {proof.name} "
            f"{'inside' if target.is_dir() else 'beside'} it); move it away or choose another path"
        )
    if not overwrite:
        raise UnsafeWriteError(
            f"{str(target)!r} exists and is not empty; pass {option_hint('overwrite', 'true', True)}"
        )
    return target


@contextlib.contextmanager
def replace_dir_safely(
    target: str | Path, marker: str, protected: Iterable[str | Path] = (), overwrite: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; move it into place only if the block succeeds.

    `check_replaceable` decides first (the block must write `marker` into the folder, so a later
    write may replace it). An error leaves `target` as it was and no new folders behind.
    """
    target = check_replaceable(target, marker, protected, overwrite)
    if target.exists() and not target.is_dir():
        raise UnsafeWriteError(f"{str(target)!r} exists and is not a folder")
    created = next((p for p in reversed(target.parents) if not p.exists()), None)  # outermost missing folder
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        if not (tmp / marker).is_file():
            raise RuntimeError(f"the writer of {target} did not write its marker {marker}")
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
            if created is not None and not target.exists():  # a failed write leaves no new folders
                shutil.rmtree(created, ignore_errors=True)


def write_file_safely(path: str | Path, write: Callable[[str], object], marker: str) -> None:
    """`atomic_write` under `check_replaceable`, then the marker beside the file proves who wrote it."""
    path = check_replaceable(path, marker)
    if path.exists() and path.is_dir():
        raise UnsafeWriteError(f"{str(path)!r} is a folder, not a file")
    atomic_write(path, write)
    (path.parent / marker).write_text(f"{path.name} written by lightning-peft\n")
