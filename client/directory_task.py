"""The one task a daemon's data directory serves (DIR/state.json).

Stored items are never reinterpreted as another task's: a directory changes task only when it
holds nothing of the old one (an empty history and nothing derived from one: a fresh directory,
or one after forget), and the refusal says how to go on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from shared.adapters import FRAMEWORK_VERSION
from shared.fileio import atomic_write, fsync_dir

from .settings import DaemonSpec
from .userdir import derived_from_history

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
RECEIVED_BASE = "base_adapter"  # DIR/base_adapter: the federation's base adapter (client/userdir.py)


def claim_for_task(data_dir: Path, spec: DaemonSpec, history_count: Callable[[], int]) -> None:
    """Record that `data_dir` serves spec.task, or refuse (ValueError) when it holds another
    task's history or files derived from one. `history_count` counts the stored items."""
    path = data_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        state = None
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{path} is unreadable ({e}); fix or remove it") from None
    old = state.get("task") if state is not None else None
    if old is not None and old != spec.task:
        items, derived = history_count(), derived_from_history(data_dir)
        if items or derived:
            raise ValueError(_task_change_refused(data_dir, old, spec.task, items, derived))
        log.info("%s held no %s history any more: it now serves %s", data_dir, old, spec.task)
        _drop_received_base(data_dir, old)
    # Also read by the federation's ClientApp (client/userdir.py) when daemon.toml is elsewhere.
    fresh = {"task": spec.task, "augmentation": spec.augmentation,
             "created": (state or {}).get("created", time.time()), "framework_version": FRAMEWORK_VERSION}
    if state != fresh:
        atomic_write(path, json.dumps(fresh))


def _drop_received_base(data_dir: Path, old: str) -> None:
    """A directory switched to another task keeps no base adapter of the old one (it would
    answer the new task's questions with what it learned for the old task's)."""
    base = data_dir / RECEIVED_BASE
    if not base.exists():
        return
    gone = base.with_name(f".{RECEIVED_BASE}.old-{os.getpid()}")
    os.replace(base, gone)
    fsync_dir(data_dir)
    shutil.rmtree(gone, ignore_errors=True)
    log.info("removed %s: the base adapter of %s", base, old)


def _task_change_refused(d: Path, old: str, new: str, items: int, derived: list[str]) -> str:
    held = f"{items} history items" if items else f"files derived from its history ({', '.join(derived[:3])}" + \
        (", ..." if len(derived) > 3 else "") + ")"
    return (f"{d} holds {old!r} data ({held}) but daemon.task={new!r}; a data directory serves one task. "
            f"To keep using it for {old}: oppu client daemon --data-dir {d} --task {old} (or set task = \"{old}\" "
            f"in {d / 'daemon.toml'}). For {new}, another directory: oppu client daemon --data-dir NEW_DIR --task "
            f"{new}. To switch this one to {new}: start it with --task {old}, keep a copy with `oppu client export "
            f"FILE` if you like (it imports only into a {old} daemon), run `oppu client forget --yes`, stop it, "
            f"and start it with --task {new}")
