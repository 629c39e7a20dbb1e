"""What is stored, as snapshots that can be compared: the reliability suite takes one before and
one after every bad input it sends, and the "changed stored state" figure of docs/reliability.md
is the number of refused inputs whose two snapshots differ (measured, never assumed).

A snapshot names every file by its path under the root and its sha256, plus the logical state the
files stand for where that is what a user sees (the history store's items, records and profile,
the published adapter version): a refused input must change neither. Only lock files are left
out: they are created empty by readers and hold nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_NAMES = {".lock"}


def files(root: Path, *, skip_dirs: tuple[str, ...] = (), skip: Any = None) -> dict[str, str]:
    """Every regular file under `root` (recursively) -> its sha256; `skip_dirs` are top-level
    directories left out (a directory the code under test is told to use as scratch space),
    `skip(parts)` any other path left out (compared some other way)."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] in skip_dirs or p.name in LOCK_NAMES or p.is_symlink() or not p.is_file():
            continue
        if skip is not None and skip(rel.parts):
            continue
        out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def history(store: Any) -> dict[str, Any]:
    """A history store's items (id, fields, time, in the store's order), its profile and, for a
    Chroma store, every record as Chroma holds it: document, metadata (seq, order) and embedding.

    Chroma's own files are compared through what they hold, not byte for byte: closing and
    reopening a client (as a daemon restart does) rewrites index bookkeeping in chroma.sqlite3
    and the HNSW files without changing a record."""
    items = [(it.id, json.dumps(dict(it.fields), sort_keys=True), it.time) for it in store.items()]
    out: dict[str, Any] = {"items": items, "profile": store.get_profile()}
    col = getattr(store, "_col", None)
    if col is not None:
        got = col.get(include=["documents", "metadatas", "embeddings"])
        records = {}
        for id_, doc, md, emb in zip(got["ids"], got["documents"], got["metadatas"], got["embeddings"]):
            h = hashlib.sha256(json.dumps([doc, md], sort_keys=True).encode())
            h.update(bytes(memoryview(_float32(emb))))
            records[id_] = h.hexdigest()
        out["records"] = records
    return out


def _float32(v: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(np.asarray(v, dtype=np.float32))


def service(svc: Any) -> dict[str, Any]:
    """A ClientService's data directory: every file (adapters and CURRENT pointers, federation
    status and privacy ledgers, job records, settings, the history snapshot the ClientApp reads,
    the profile), the Chroma store by content (history()),
    and the personal adapter version it serves. tmp/ is scratch space (imports unpack there and
    remove what they unpacked; asserted by the tests that use it); logs/ is not state."""
    with svc.store_lock:
        logical = history(svc.store)
    published = svc.host.published
    return {"files": files(svc.dir, skip_dirs=("tmp", "logs"), skip=_chroma_internal), **logical,
            "published": None if published is None else published.version}


def _chroma_internal(parts: tuple[str, ...]) -> bool:
    """history/chroma.sqlite3 and history/<segment>/...: compared by their records (history()).
    Everything else under history/ (the profile, the ClientApp's snapshot, the owner lock) is
    compared byte for byte."""
    return parts[0] == "history" and (parts[1:] == ("chroma.sqlite3",) or len(parts) > 2)


def artifact_cache(cache: Any) -> dict[str, str]:
    """The complete artifacts a cache holds, file by file (the partial transfers beside them are
    work in progress, not stored state: a refused chunk may discard one, by design)."""
    out: dict[str, str] = {}
    for artifact_id in cache.held():
        for rel, digest in files(cache.root / artifact_id).items():
            out[f"{artifact_id}/{rel}"] = digest
    return out


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What changed between two snapshots, in words (for assertion messages)."""
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if key not in before or key not in after:  # a file snapshot: path -> sha256
            out.append(f"{key} {'added' if key not in before else 'removed'}")
        elif isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    what = "added" if name not in a else "removed" if name not in b else "changed"
                    out.append(f"{key}: {name} {what}")
        else:
            out.append(f"{key} changed")
    return out


@dataclass
class Measured:
    """The tally of one area: inputs tried, refused, valid and accepted, and refused inputs whose
    snapshots differ. `refused_input(before, after)` records one refusal and returns what changed."""

    tried: int = 0
    refused: int = 0
    valid: int = 0
    changed: int = 0

    def refused_input(self, before: Any, after: Any) -> list[str]:
        self.tried += 1
        self.refused += 1
        if before == after:
            return []
        self.changed += 1
        return differences(before, after) if isinstance(before, dict) and isinstance(after, dict) else ["changed"]

    def accepted_input(self) -> None:
        self.tried += 1
        self.valid += 1
