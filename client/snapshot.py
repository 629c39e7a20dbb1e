"""The daemon's read-only copy of a user's history, for the federation's ClientApp.

Chroma's store must have one owner (client.store.ChromaHistoryStore holds DIR/history/owner.lock),
and the owner is the daemon. The ClientApp, which the SuperNode runs in other processes, reads this
snapshot instead: DIR/history/history.snapshot.jsonl, rewritten by the daemon with every change it
acknowledges (an added batch, an import, a profile, forget) and once at start, before the SuperNode
starts. Each write goes to a temporary file that is fsynced and renamed over the old one, so a
reader sees one acknowledged state of the history, whole, never a mix.

Format (JSON Lines, UTF-8):

    {"format": "oppu-history-snapshot", "version": 1, "task": str, "count": int, "profile": str | null}
    {"id": str, "fields": {str: str}, "time": int}      one line per item, oldest first; `count` lines

This module imports neither chromadb nor the store: a reader gets an in-memory store whose dense
retrieval embeds with the same MiniLM (client.embedder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from shared.fileio import atomic_file
from shared.records import HistoryItem
from shared.retrieval import InMemoryHistoryStore, TextOf

from .embedder import MiniLMEmbedder

SNAPSHOT_FILE = "history.snapshot.jsonl"
FORMAT = "oppu-history-snapshot"
VERSION = 1


class SnapshotError(ValueError):
    """The snapshot file is not one the daemon wrote (truncated, edited, another format)."""


@dataclass(frozen=True)
class Snapshot:
    task: str
    profile: str | None
    items: tuple[HistoryItem, ...]


def snapshot_path(history_dir: str | Path) -> Path:
    return Path(history_dir) / SNAPSHOT_FILE


def write_snapshot(path: str | Path, items: Sequence[HistoryItem], *, task: str, profile: str | None) -> Path:
    """Replace the snapshot at `path` with these items (chronological, as the store lists them),
    atomically and durably (shared.fileio.atomic_file: the file fsynced before the rename, the
    directory after it), streamed line by line: a long history is never one string in memory."""
    path = Path(path)
    header = {"format": FORMAT, "version": VERSION, "task": task, "count": len(items), "profile": profile}
    with atomic_file(path, mode=0o600) as fh:
        fh.write(_line(header))
        for it in items:
            fh.write(_line({"id": it.id, "fields": dict(it.fields), "time": int(it.time)}))
    return path


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def read_snapshot(path: str | Path) -> Snapshot:
    """The snapshot at `path`, checked whole; SnapshotError names the line and field at fault."""
    path = Path(path)
    lines = path.read_bytes().decode("utf-8", errors="strict").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    else:
        raise SnapshotError(f"{path} does not end with a newline: not a complete snapshot")
    header = _json(path, 1, lines[0] if lines else "")
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise SnapshotError(f"{path} line 1: format {header.get('format')!r} version {header.get('version')!r}, "
                            f"expected {FORMAT!r} version {VERSION}")
    task, profile, count = header.get("task"), header.get("profile"), header.get("count")
    if not isinstance(task, str) or not (profile is None or isinstance(profile, str)):
        raise SnapshotError(f"{path} line 1: 'task' must be a string and 'profile' a string or null")
    if type(count) is not int or count != len(lines) - 1:
        raise SnapshotError(f"{path} line 1: 'count' is {count!r} but the file holds {len(lines) - 1} items")
    items = tuple(_item(path, n, line) for n, line in enumerate(lines[1:], start=2))
    if len({it.id for it in items}) != len(items):
        raise SnapshotError(f"{path}: an item id occurs twice")
    return Snapshot(task=task, profile=profile, items=items)


def snapshot_store(snapshot: Snapshot, text_of: TextOf, *, retriever: str) -> InMemoryHistoryStore:
    """An in-memory store over the snapshot's items and profile (MiniLM vectors, computed on first
    use, when the retriever is dense or hybrid; none for BM25). Changes to it stay in memory."""
    embed = None
    if retriever != "bm25":
        embed = MiniLMEmbedder()
    store = InMemoryHistoryStore(text_of, embed)
    store.add(snapshot.items)
    if snapshot.profile:
        store.set_profile(snapshot.profile)
    return store


def _json(path: Path, n: int, line: str) -> dict[str, Any]:
    try:
        got = json.loads(line)
    except ValueError as e:
        raise SnapshotError(f"{path} line {n}: not JSON ({e})") from None
    if not isinstance(got, dict):
        raise SnapshotError(f"{path} line {n}: expected a JSON object")
    return got


def _item(path: Path, n: int, line: str) -> HistoryItem:
    d = _json(path, n, line)
    if set(d) != {"id", "fields", "time"}:
        raise SnapshotError(f"{path} line {n}: keys {sorted(d)}, expected ['fields', 'id', 'time']")
    fields = d["fields"]
    if not isinstance(d["id"], str) or type(d["time"]) is not int:
        raise SnapshotError(f"{path} line {n}: 'id' must be a string and 'time' an integer")
    if not isinstance(fields, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items()):
        raise SnapshotError(f"{path} line {n}: 'fields' must map strings to strings")
    return HistoryItem(id=d["id"], fields=fields, time=d["time"])
