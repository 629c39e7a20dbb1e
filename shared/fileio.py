"""Atomic writes of files and directories: a reader sees the old one or the new one, never half of
either."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def atomic_write(path: str | Path, data: str | bytes, *, mode: int | None = None) -> Path:
    """Write `data` to `path` via a temporary file in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def fsync_dir(directory: str | Path) -> None:
    """Persist a rename inside `directory` (best effort: some filesystems refuse to open dirs)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_dir(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Let `fill` write a temporary sibling directory, fsync every file in it, then swap it into
    `target` with two renames. A crash leaves the previous `target` (or, between the two renames,
    a sibling `.<name>.old-<pid>` that readers may fall back to), never a mix of old and new."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        for p in tmp.rglob("*"):  # file data reaches the disk before the rename makes it visible
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
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
