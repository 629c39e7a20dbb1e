"""Atomic, durable writes of files and directories: a reader sees the old one or the new one,
never half of either, and once a call returns the new one survives a power cut.

Durability needs two fsyncs: the file's data before the rename (else the rename can reach the
disk before the data, leaving an empty file under the new name), and the directory after it (the
rename itself is an update of the directory, lost on a power cut until the directory is synced).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def fsync_dir(directory: str | Path) -> None:
    """Persist the entries of `directory` (a rename, a create or an unlink inside it). Best effort:
    a filesystem that cannot open a directory for reading cannot sync one either."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # EINVAL: this filesystem does not sync directories; anything else is real
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, *, mode: int | None = None) -> Iterator[BinaryIO]:
    """Write `path` through the yielded binary file: a temporary sibling that, when the block
    ends without an exception, is fsynced, given `mode`, renamed over `path`, and the directory
    fsynced. An exception removes the temporary file and leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes, *, mode: int | None = None) -> Path:
    """Replace `path` with `data` atomically and durably (see `atomic_file`)."""
    with atomic_file(path, mode=mode) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def create_new(path: str | Path, data: str | bytes, *, mode: int = 0o600) -> bool:
    """Create `path` holding `data` unless it exists; True when this call created it.

    The file is written and fsynced under a temporary name with `mode` and then hard-linked to
    `path`, which fails when `path` exists: no process ever sees `path` empty or half written,
    and of two racing creators exactly one wins (the other reads the winner's file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (and `root`): data and entries on disk."""
    for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_symlink():
            continue
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(root)


def atomic_dir(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Let `fill` write a temporary sibling directory, fsync everything in it, then swap it into
    `target` with two renames and fsync the parent. A crash leaves the previous `target` (or,
    between the two renames, a sibling `.<name>.old-<pid>` that readers may fall back to), never
    a mix of old and new."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)  # file data reaches the disk before the rename makes it visible
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def locked_dir(root: str | Path, *, mode: int = 0o777) -> Iterator[Path]:
    """Hold an exclusive lock on directory `root` (created with `mode` when missing) for the
    block: an flock on root/.lock, so every process that writes there takes turns (the OS drops
    the lock of a process that dies)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True, mode=mode)
    with open(root / ".lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield root
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
