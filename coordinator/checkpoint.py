"""The coordinator's checkpoint: everything a restarted coordinator needs, in one directory,
replaced atomically after every round.

    checkpoint/
      state.json            round completed, accountant state, per-round history, config, status
      base_adapter/         the global base adapter (PEFT format + oppu_adapter.json)
      strategy.safetensors  server-side optimizer state (FedAdam moments), when there is any

The new checkpoint is written to a temporary sibling and swapped in with two renames; a crash
between them leaves `.checkpoint.old-*`, which `load` falls back to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.fileio import atomic_dir

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
    """The last complete checkpoint, or None when there is none."""
    target = Path(target)
    candidates = [target] + sorted(target.parent.glob(f".{target.name}.old-*")) if target.parent.is_dir() else [target]
    for d in candidates:
        f = d / STATE
        if not f.is_file():
            continue
        state = json.loads(f.read_text())
        strategy: dict[str, np.ndarray] = {}
        if (d / STRATEGY).is_file():
            from safetensors.numpy import load_file

            strategy = dict(load_file(str(d / STRATEGY)))
        return Checkpoint(int(state["round"]), state.get("accountant"), list(state.get("history", [])),
                          dict(state.get("config", {})), str(state.get("status", "running")),
                          dict(state.get("artifacts", {})), strategy, dict(state.get("initial", {})), d)
    return None
