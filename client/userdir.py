"""One user's data directory, as the federation's ClientApp sees it.

The same layout the client daemon manages (client/daemon.py), so a SuperNode started by the daemon
(node config `data-dir`) and a simulated user run the same code:

    history/              the user's Chroma history store; in a daemon's directory the daemon owns it
                          (owner.lock) and this ClientApp reads history/history.snapshot.jsonl,
                          the daemon's atomic read-only copy (client/snapshot.py), instead
    history.json          ... or the raw items, for runs configured with retrieval.store='memory'
    daemon.toml           (daemon-managed directories) the daemon's settings: task, augmentation
    user.json             (simulated users) {"user_id", "task"}
    queries.json          (simulated users) held-out queries with their answers, for evaluation
    personal/             the published personal adapter for the primary augmentation
                          (client.personal.PersonalAdapters: versions + CURRENT)
    personal-<aug>/       personal adapters for the other augmentations a run evaluates
    base_adapter/         the latest global base adapter received (atomic)
    federation.json       {"rounds", "epsilon", "delta", "updated"}: read by the daemon
    federation/           this ClientApp's own cache (a generated PAG profile, selection records)
                          and its per-record privacy ledgers (record-privacy-*.json)
    predictions.json      (simulated users) this user's answers per method; never sent

`HISTORY_DERIVED` below is the one list of what in this directory was derived from the history;
`forget_derived` deletes it and `derived_from_history` (shown by the daemon's status) lists what
of it is still there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from client.embedder import MiniLMEmbedder
from client.personal import PersonalAdapters
from client.settings import load_daemon
from client.snapshot import SNAPSHOT_FILE, read_snapshot, snapshot_path, snapshot_store
from shared.fileio import atomic_write, fsync_dir
from shared.protocol import ClientError
from shared.records import HistoryItem, Query
from shared.retrieval import InMemoryHistoryStore

log = logging.getLogger(__name__)

FEDERATION_STATUS = "federation.json"
PRIMARY_DEFAULT = "rag"  # DaemonSpec's default augmentation

# Everything in a data directory derived from the user's history (glob patterns relative to it;
# a directory stands for every file under it). The history store itself (history/) is emptied
# by its owner (client.service), which also resets the personal/ adapters it has loaded and
# rewrites the snapshot with no items once this list is deleted.
HISTORY_DERIVED: tuple[str, ...] = (
    "history/*.profile.json",  # the PAG profile kept with the store
    f"history/{SNAPSHOT_FILE}",  # the daemon's copy of the history for the ClientApp (client/snapshot.py)
    "personal/v*",  # the daemon's personal adapters (client.personal), trained on the history
    "personal/.v*",  # ... and their half-written or half-replaced copies
    "personal/CURRENT",
    "personal-*",  # the personal adapters of every other augmentation (the ClientApp's)
    "federation/profile.txt",  # a PAG profile the model wrote from the history
    "federation/selection-*.json",  # validation on the user's recent items
    "history.json",  # (simulated users) the raw items, their held-out queries and answers
    "queries.json",
    "predictions.json",
    "jobs/*.json",  # training job records (counts, losses)
    "tmp",  # imports and exports in flight: whole histories
    "logs/*.log.*",  # rotated logs, which may quote items
)
LIVE_LOGS = "logs/*.log"  # logs open for appending (daemon, SuperNode): emptied, not removed
# Kept on purpose: daemon.toml, token, daemon.lock/.json, state.json (settings and identity);
# base_adapter/ (the federation's shared adapter, not this user's); federation.json and
# federation/record-privacy-*.json (privacy already spent stays accounted: a later history,
# even the same one re-imported, is charged on top of it); empty .lock files.


def _derived_paths(root: Path) -> list[Path]:
    found: set[Path] = set()
    for pattern in HISTORY_DERIVED:
        for p in root.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                found.update(q for q in p.rglob("*") if not q.is_dir() or q.is_symlink())
                found.add(p)
            else:
                found.add(p)
    return sorted(found)


def derived_from_history(root: str | Path) -> list[str]:
    """The files in data directory `root` derived from the history (HISTORY_DERIVED), relative
    paths, sorted; none after `forget_derived`. Files that carry nothing are left out: empty lock
    files, and the snapshot of an empty history the daemon writes after forget."""
    root = Path(root)
    out = []
    for p in _derived_paths(root):
        if p.is_dir() and not p.is_symlink():
            continue
        if _carries_nothing(p):
            continue
        out.append(p.relative_to(root).as_posix())
    return out


def _carries_nothing(p: Path) -> bool:
    if p.name == ".lock":
        return p.stat().st_size == 0
    if p.name == SNAPSHOT_FILE:
        try:
            snap = read_snapshot(p)
        except (OSError, ValueError):  # unreadable or damaged: it may still hold items
            return False
        return not snap.items and snap.profile is None
    return False


def forget_derived(root: str | Path) -> list[str]:
    """Delete every file derived from the history (HISTORY_DERIVED) and empty the live logs;
    returns the relative paths removed. Adapter directories are emptied under their publish lock
    (client.personal) so a process publishing into one cannot interleave."""
    root = Path(root)
    removed = derived_from_history(root)
    for adapters in sorted(root.glob("personal-*")):
        if adapters.is_dir() and not adapters.is_symlink():
            PersonalAdapters(adapters).forget()
    for p in reversed(_derived_paths(root)):  # deepest first
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for log_file in root.glob(LIVE_LOGS):
        if log_file.is_file() and not log_file.is_symlink():
            with open(log_file, "r+b") as fh:  # writers append (O_APPEND): they go on at offset 0
                fh.truncate(0)
                os.fsync(fh.fileno())
    for d in {root, root / "personal", root / "federation", root / "jobs", root / "logs"}:
        if d.is_dir():
            fsync_dir(d)
    return removed


class UserDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise ClientError("the user data directory given to this node does not exist")

    # -- what the user's machine knows about itself --------------------------------------------

    def _daemon(self) -> Any:
        """The daemon's settings (daemon.toml), parsed once per UserDir; None where none."""
        if not hasattr(self, "_daemon_spec"):
            f = self.path / "daemon.toml"
            self._daemon_spec = load_daemon(f) if f.is_file() else None
        return self._daemon_spec

    def task_name(self) -> str | None:
        f = self.path / "user.json"
        if f.is_file():
            return str(json.loads(f.read_text()).get("task") or "") or None
        daemon = self._daemon()
        return daemon.task if daemon else None

    def primary_augmentation(self) -> str:
        daemon = self._daemon()
        return daemon.augmentation if daemon else PRIMARY_DEFAULT

    def personal_root(self, augmentation: str) -> Path:
        if augmentation == self.primary_augmentation():
            return self.path / "personal"
        return self.path / f"personal-{augmentation}"

    # -- history and queries -------------------------------------------------------------------

    def open_store(self, task: Any, *, store: str, retriever: str) -> Any:
        """This user's history for a round. A daemon's directory has its snapshot (the daemon owns
        the Chroma store: client/snapshot.py), whatever store the run names; a simulated user's
        has a Chroma store (store='chroma') or history.json."""
        snap = snapshot_path(self.path / "history")
        if snap.is_file():
            snapshot = read_snapshot(snap)
            if snapshot.task != task.name:
                raise ClientError(f"this user's history is for task {snapshot.task!r}, the run is {task.name!r}")
            return snapshot_store(snapshot, task.item_text, retriever=retriever)
        if (self.path / "history").is_dir() and store == "chroma":
            from client.store import open_history_store  # refused (StoreInUse) while another process owns it

            return open_history_store("chroma", self.path / "history", task.item_text, retriever=retriever)
        f = self.path / "history.json"
        if not f.is_file():
            raise ClientError("the user data directory holds no history store (history/ or history.json)")
        mem = InMemoryHistoryStore(task.item_text, MiniLMEmbedder() if retriever != "bm25" else None)
        mem.add([HistoryItem(d["id"], d["fields"], int(d.get("time", 0))) for d in json.loads(f.read_text())])
        return mem

    def queries(self) -> list[Query]:
        f = self.path / "queries.json"
        if not f.is_file():
            return []
        return [Query(q["id"], q["input"], q.get("target")) for q in json.loads(f.read_text())]

    # -- what this ClientApp writes ------------------------------------------------------------

    def cached_profile(self) -> str | None:
        f = self.path / "federation" / "profile.txt"
        return f.read_text() if f.is_file() else None

    def cache_profile(self, text: str) -> None:
        atomic_write(self.path / "federation" / "profile.txt", text)

    def record_round(self, *, epsilon: float | None, delta: float | None) -> dict[str, Any]:
        """Bump federation.json after a round this user took part in (the daemon reads it)."""
        f = self.path / FEDERATION_STATUS
        rounds = 0
        try:
            rounds = int(json.loads(f.read_text()).get("rounds", 0))
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            pass
        status = {"rounds": rounds + 1, "epsilon": epsilon, "delta": delta, "updated": time.time()}
        atomic_write(f, json.dumps(status, indent=2))
        return status

    def write_predictions(self, predictions: dict[str, dict[str, str]]) -> None:
        atomic_write(self.path / "predictions.json", json.dumps(predictions, indent=2))
