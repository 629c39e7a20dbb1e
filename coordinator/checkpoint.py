"""The coordinator's checkpoint: everything a restarted coordinator needs, in one directory,
replaced atomically after every round.

    checkpoint/
      state.json            round completed, accountant state, per-round history, config, status
      base_adapter/         the global base adapter (PEFT format + oppu_adapter.json)
      strategy.safetensors  server-side optimizer state (FedAdam moments), when there is any

The new checkpoint is written to a temporary sibling and swapped in with two renames
(shared.fileio.atomic_dir); a crash between them leaves `.checkpoint.old-<pid>` and no
`checkpoint/`, and crashes in several runs can leave several such copies of different rounds
(and `.checkpoint.tmp-*`, never published, which is only removed).
`load` therefore reads every copy, keeps the complete one with the highest round (state.json
parses, the base adapter's files match their sha256, the strategy state loads), moves it to
`checkpoint/` if it is not there, and removes the other copies, so a restart never resumes from
an older round because of how its directory happens to be named.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.adapters import verify_adapter_dir
from shared.fileio import atomic_dir, fsync_dir

log = logging.getLogger("oppu.coordinator")

STATE = "state.json"
BASE = "base_adapter"
STRATEGY = "strategy.safetensors"


@dataclass
class Checkpoint:
    round: int
    accountant: dict[str, Any] | None
    history: list[dict[str, Any]]
    config: dict[str, Any]
    status: str = "running"
    artifacts: dict[str, str] = field(default_factory=dict)
    strategy: dict[str, np.ndarray] = field(default_factory=dict)
    initial: dict[str, float] = field(default_factory=dict)  # evaluation before round 1
    directory: Path | None = None

    @property
    def base_adapter_dir(self) -> Path:
        assert self.directory is not None
        return self.directory / BASE


def save(target: Path, ckpt: Checkpoint, write_base: Any) -> Path:
    """Write `ckpt` (and the base adapter via `write_base(dir)`) to `target` atomically."""
    def fill(tmp: Path) -> None:
        write_base(tmp / BASE)
        if ckpt.strategy:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in ckpt.strategy.items()}, str(tmp / STRATEGY))
        state = {"round": ckpt.round, "accountant": ckpt.accountant, "history": ckpt.history,
                 "config": ckpt.config, "status": ckpt.status, "artifacts": ckpt.artifacts,
                 "initial": ckpt.initial}
        (tmp / STATE).write_text(json.dumps(state, indent=2))

    return atomic_dir(target, fill)


def load(target: Path) -> Checkpoint | None:
    """The complete checkpoint of the highest round among `target` and its leftover copies,
    settled in `target` with the other copies removed; None when there is no complete one."""
    target = Path(target)
    if not target.parent.is_dir():
        return None
    copies = sorted(target.parent.glob(f".{target.name}.old-*"))  # .tmp-* were never published
    best: Checkpoint | None = None
    for d in [target] + copies:
        ckpt = _read_complete(d)
        if ckpt is not None and (best is None or ckpt.round > best.round):
            best = ckpt
    if best is not None and best.directory != target:
        if target.exists():  # incomplete or older: it gives way to the newer complete copy
            os.replace(target, target.with_name(f".{target.name}.old-stale-{os.getpid()}"))
        os.replace(best.directory, target)
        best.directory = target
    for d in target.parent.glob(f".{target.name}.*"):
        if d.name.startswith((f".{target.name}.old-", f".{target.name}.tmp-")):
            log.warning("checkpoint: removing the stale copy %s", d)
            shutil.rmtree(d, ignore_errors=True)
    fsync_dir(target.parent)
    return best


def _read_complete(d: Path) -> Checkpoint | None:
    """The checkpoint in `d` if every part of it reads back intact, else None (with why, logged)."""
    if not (d / STATE).is_file():
        return None
    try:
        state = json.loads((d / STATE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("round"), int):
            raise ValueError(f"{STATE} has no integer round")
        verify_adapter_dir(d / BASE)
        strategy: dict[str, np.ndarray] = {}
        if (d / STRATEGY).is_file():
            from safetensors.numpy import load_file

            strategy = dict(load_file(str(d / STRATEGY)))
    except Exception as e:  # noqa: BLE001 - any damage makes this copy unusable, not the run
        log.warning("checkpoint: %s is incomplete or damaged (%s); not resuming from it", d, e)
        return None
    return Checkpoint(state["round"], state.get("accountant"), list(state.get("history", [])),
                      dict(state.get("config", {})), str(state.get("status", "running")),
                      dict(state.get("artifacts", {})), strategy, dict(state.get("initial", {})), d)
