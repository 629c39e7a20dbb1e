"""Ranking a user's history for a query: BM25 (as OPPU), dense, and their reciprocal-rank fusion.

Retrievers are stateless about *which* user they serve: they take a `HistoryStore` per call, so
one retriever object serves every user in a simulation. `before=i` restricts a search to the
first i items in chronological order; training example i uses it so it never sees its own item
or anything later (no leakage of the future into the personal adapter's training prompts).

Nothing here imports chromadb: the persistent store lives in `client.store`; this module carries
the protocol and an in-memory store for tests and simulations.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from shared.records import HistoryItem

TextOf = Callable[[HistoryItem], str]
Embed = Callable[[list[str]], np.ndarray]

RETRIEVER_KINDS = ("bm25", "dense", "hybrid")
K_RRF = 60  # the constant of Cormack et al. (2009); damps the weight of the very top ranks


@runtime_checkable
class HistoryStore(Protocol):
    """A user's history: chronologically ordered items, semantic search, and an optional profile."""

    def add(self, items: Sequence[HistoryItem]) -> int:
        """Add items; ids already present with the same content are skipped. Returns how many were new."""
        ...

    def items(self) -> list[HistoryItem]:
        """All items, chronological: by time, then insertion order."""
        ...

    def count(self) -> int: ...

    def get(self, ids: Sequence[str]) -> list[HistoryItem]:
        """The items with these ids, in the order asked; unknown ids are left out."""
        ...

    def dense_search(self, query: str, k: int, *, before: int | None = None) -> list[tuple[HistoryItem, float]]:
        """Top-k (item, similarity) by embedding similarity, best first, among the first `before` items."""
        ...

    def get_profile(self) -> str | None: ...

    def set_profile(self, text: str) -> None: ...

    def clear(self) -> None: ...


def same_content(a: HistoryItem, b: HistoryItem) -> bool:
    """Whether two items with one id are the same record (fields compared as plain dicts)."""
    return a.time == b.time and dict(a.fields) == dict(b.fields)


def chronological(items: Sequence[HistoryItem]) -> list[HistoryItem]:
    """Items sorted by time; `sorted` is stable, so equal times keep their given (insertion) order."""
    return sorted(items, key=lambda it: it.time)


def _restrict(items: list[HistoryItem], before: int | None) -> list[HistoryItem]:
    return items if before is None else items[: max(0, before)]


class InMemoryHistoryStore:
    """A HistoryStore held in a Python list: for tests, simulations and BM25-only runs.

    `embed` (texts -> (n, d) array) is only needed for `dense_search`; embeddings are computed
    lazily, once per item, so a BM25-only run never pays for an embedding model.
    """

    def __init__(self, text_of: TextOf, embed: Embed | None = None) -> None:
        self._text_of = text_of
        self._embed = embed
        self._by_id: dict[str, HistoryItem] = {}
        self._inserted: list[HistoryItem] = []  # insertion order; the tie-break for equal times
        self._sorted: list[HistoryItem] | None = None  # chronological cache, dropped on change
        self._vectors: dict[str, np.ndarray] = {}
        self._profile: str | None = None

    def add(self, items: Sequence[HistoryItem]) -> int:
        new = new_items(items, self._by_id.get)
        for it in new:
            self._by_id[it.id] = it
            self._inserted.append(it)
        if new:
            self._sorted = None
        return len(new)

    def items(self) -> list[HistoryItem]:
        if self._sorted is None:
            self._sorted = chronological(self._inserted)
        return list(self._sorted)

    def count(self) -> int:
        return len(self._inserted)

    def get(self, ids: Sequence[str]) -> list[HistoryItem]:
        return [self._by_id[i] for i in ids if i in self._by_id]

    def dense_search(self, query: str, k: int, *, before: int | None = None) -> list[tuple[HistoryItem, float]]:
        if self._embed is None:
            raise RuntimeError(
                "InMemoryHistoryStore.dense_search needs an embedder: construct it with "
                "embed=... (e.g. client.embedder.MiniLMEmbedder()) or use the BM25 retriever"
            )
        pool = _restrict(self.items(), before)
        if k <= 0 or not pool:
            return []
        missing = [it for it in pool if it.id not in self._vectors]
        if missing:
            vecs = _unit_rows(np.asarray(self._embed([self._text_of(it) for it in missing]), dtype=np.float32))
            self._vectors.update({it.id: v for it, v in zip(missing, vecs)})
        q = _unit_rows(np.asarray(self._embed([query]), dtype=np.float32))[0]
        sims = np.stack([self._vectors[it.id] for it in pool]) @ q
        # Best first; equal scores go to the more recent item (see `_rank`).
        order = _rank(sims)[:k]
        return [(pool[i], float(sims[i])) for i in order]

    def get_profile(self) -> str | None:
        return self._profile

    def set_profile(self, text: str) -> None:
        self._profile = text

    def clear(self) -> None:
        self._by_id.clear()
        self._inserted.clear()
        self._vectors.clear()
        self._sorted = None
        self._profile = None


def new_items(items: Sequence[HistoryItem], existing: Callable[[str], HistoryItem | None]) -> list[HistoryItem]:
    """The items not yet stored, after checking the whole batch first so a conflict changes nothing.

    Shared by every store so they agree on idempotency: an id seen again (in the store or earlier
    in the batch) with identical content is skipped; with different content it is an error.
    """
    seen: dict[str, HistoryItem] = {}
    new: list[HistoryItem] = []
    for it in items:
        prior = seen.get(it.id) or existing(it.id)
        if prior is not None:
            if not same_content(prior, it):
                raise ValueError(f"history item id {it.id!r} is already stored with different content")
            continue
        seen[it.id] = it
        new.append(it)
    return new


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows so a dot product is cosine similarity (zero rows stay zero)."""
    if x.ndim == 1:
        x = x[None, :]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def _rank(scores: np.ndarray) -> list[int]:
    """Indices by score descending; ties go to the later (more recent) chronological position.

    Recent history reflects the user's current preferences better, and a fixed rule keeps
    prompts, and so training, reproducible.
    """
    n = len(scores)
    return sorted(range(n), key=lambda i: (-float(scores[i]), -i))


# --------------------------------------------------------------------------------------- BM25

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens: simple, language-agnostic, and what OPPU's BM25 baseline does."""
    return _WORD.findall(text.lower())


def _okapi_class() -> type:
    """BM25Okapi with Lucene's non-negative IDF, log(1 + (N - df + 0.5) / (df + 0.5)).

    rank_bm25's Okapi IDF is zero for a term in exactly half the documents and negative beyond
    (floored to epsilon * mean IDF, which is itself negative when most terms are common). On the
    tiny corpora training sees (`before=1, 2, ...`) that makes a matching item score at or
    *below* a non-matching one. Lucene's IDF keeps the same term weighting on large corpora and
    is positive everywhere, so a match never hurts.
    """
    import math

    from rank_bm25 import BM25Okapi

    class LuceneIdfBM25Okapi(BM25Okapi):
        def _calc_idf(self, nd: dict[str, int]) -> None:
            n = self.corpus_size
            self.idf = {w: math.log(1.0 + (n - df + 0.5) / (df + 0.5)) for w, df in nd.items()}
            self.average_idf = sum(self.idf.values()) / max(1, len(self.idf))

    return LuceneIdfBM25Okapi


class _BM25Index:
    """BM25Okapi over one restricted item list (IDF depends on the corpus, so one per `before`)."""

    def __init__(self, items: list[HistoryItem], text_of: TextOf) -> None:
        self.items = items
        docs = [tokenize(text_of(it)) for it in items]
        # BM25 divides by the mean document length: an all-empty corpus would raise
        # ZeroDivisionError, so it simply scores everything zero.
        self._bm25 = _okapi_class()(docs) if any(docs) else None

    def scores(self, query: str) -> np.ndarray:
        if self._bm25 is None:
            return np.zeros(len(self.items))
        return np.asarray(self._bm25.get_scores(tokenize(query)), dtype=np.float64)


class BM25Retriever:
    """Okapi BM25 over the (restricted) history, as in OPPU. Always returns min(k, n) items.

    Indexes are cached per (store, before) in a small LRU. A cache hit requires the store's
    current restricted item list to equal the cached one, so adding items (even ones that sort
    earlier) or clearing the store can never serve a stale index. Stores return the same item
    objects between calls, so that comparison is mostly identity checks.
    """

    def __init__(self, text_of: TextOf, *, cache_size: int = 8) -> None:
        self._text_of = text_of
        self._cache: OrderedDict[tuple[int, int | None], tuple[HistoryStore, _BM25Index]] = OrderedDict()
        self._cache_size = cache_size

    def _index(self, store: HistoryStore, before: int | None) -> _BM25Index:
        pool = _restrict(store.items(), before)
        key = (id(store), before)
        hit = self._cache.get(key)
        # Holding the store itself (not just id()) guards against id reuse after garbage collection.
        if hit is not None and hit[0] is store and hit[1].items == pool:
            self._cache.move_to_end(key)
            return hit[1]
        index = _BM25Index(pool, self._text_of)
        self._cache[key] = (store, index)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return index

    def scored(self, store: HistoryStore, query: str, *, before: int | None = None) -> list[tuple[HistoryItem, float]]:
        """Every restricted item with its BM25 score, best first."""
        index = self._index(store, before)
        scores = index.scores(query)
        return [(index.items[i], float(scores[i])) for i in _rank(scores)]

    def retrieve(self, store: HistoryStore, query: str, k: int, *, before: int | None = None) -> list[HistoryItem]:
        if k <= 0:
            return []
        return [it for it, _ in self.scored(store, query, before=before)[:k]]


class DenseRetriever:
    """Embedding similarity, delegated to the store (Chroma's HNSW index, or the in-memory matrix)."""

    def retrieve(self, store: HistoryStore, query: str, k: int, *, before: int | None = None) -> list[HistoryItem]:
        if k <= 0:
            return []
        return [it for it, _ in store.dense_search(query, k, before=before)]


class HybridRetriever:
    """Reciprocal-rank fusion of BM25 and dense rankings: score(d) = sum 1 / (K_RRF + rank(d)).

    RRF needs no score calibration between the two rankers (BM25 scores are unbounded, cosine is
    in [-1, 1]). BM25 ranks every restricted item (cheap); dense ranks the top `dense_depth(k)`,
    deep enough that an item in the fused top-k is almost surely in it.
    """

    def __init__(self, text_of: TextOf, *, k_rrf: int = K_RRF) -> None:
        self._bm25 = BM25Retriever(text_of)
        self._k_rrf = k_rrf

    @staticmethod
    def dense_depth(k: int) -> int:
        return max(4 * k, 50)

    def retrieve(self, store: HistoryStore, query: str, k: int, *, before: int | None = None) -> list[HistoryItem]:
        if k <= 0:
            return []
        lexical = self._bm25.scored(store, query, before=before)
        if not lexical:
            return []
        dense = store.dense_search(query, min(self.dense_depth(k), len(lexical)), before=before)
        # Chronological position of each candidate, for the deterministic tie-break.
        position = {it.id: i for i, it in enumerate(_restrict(store.items(), before))}
        fused: dict[str, float] = {}
        by_id: dict[str, HistoryItem] = {}
        for ranking in ([it for it, _ in lexical], [it for it, _ in dense]):
            for rank, it in enumerate(ranking, start=1):
                fused[it.id] = fused.get(it.id, 0.0) + 1.0 / (self._k_rrf + rank)
                by_id.setdefault(it.id, it)
        best = sorted(fused, key=lambda i: (-fused[i], -position.get(i, -1)))
        return [by_id[i] for i in best[:k]]


Retriever = BM25Retriever | DenseRetriever | HybridRetriever


def make_retriever(kind: Literal["bm25", "dense", "hybrid"] | str, text_of: TextOf) -> Retriever:
    """The retriever named by a RetrievalSpec's `retriever` field."""
    if kind == "bm25":
        return BM25Retriever(text_of)
    if kind == "dense":
        return DenseRetriever()
    if kind == "hybrid":
        return HybridRetriever(text_of)
    raise ValueError(f"retriever={kind!r} is not one of {', '.join(RETRIEVER_KINDS)}")
