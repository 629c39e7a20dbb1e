"""Retrievers over the in-memory store, with a tiny deterministic embedder (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from shared.records import HistoryItem
from shared.retrieval import (
    K_RRF,
    BM25Retriever,
    DenseRetriever,
    HistoryStore,
    HybridRetriever,
    InMemoryHistoryStore,
    make_retriever,
)

# Words grouped into "concepts": the fake embedder maps a text to its concept counts, so
# synonyms are close in embedding space while sharing no tokens (what BM25 cannot see).
CONCEPTS = [
    {"pizza", "pasta", "italian", "food", "lasagna", "dinner"},
    {"cat", "kitten", "feline", "purr"},
    {"stock", "market", "shares", "finance"},
    {"rain", "weather", "storm", "sunny"},
]


def fake_embed(texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), len(CONCEPTS) + 1), dtype=np.float32)
    for r, text in enumerate(texts):
        for word in text.lower().split():
            hits = [c for c, words in enumerate(CONCEPTS) if word in words]
            for c in hits:
                out[r, c] += 1.0
        out[r, -1] = 0.01  # never an all-zero vector
    return out


def text_of(item: HistoryItem) -> str:
    return item.fields["text"]


def mk(id_: str, text: str, time: int = 0) -> HistoryItem:
    return HistoryItem(id=id_, fields={"text": text}, time=time)


@pytest.fixture
def store() -> InMemoryHistoryStore:
    s = InMemoryHistoryStore(text_of, fake_embed)
    s.add([
        mk("a", "my kitten likes to purr on the sofa", 1),
        mk("b", "the stock market and shares went down", 2),
        mk("c", "lasagna for dinner again tonight", 3),
        mk("d", "storm and rain all weekend long", 4),
        mk("e", "italian pizza is the best food", 5),
    ])
    return s


def test_store_satisfies_protocol(store):
    assert isinstance(store, HistoryStore)


def test_chronological_by_time_then_insertion_order():
    s = InMemoryHistoryStore(text_of)
    s.add([mk("x", "x", 5), mk("y", "y", 1), mk("z", "z", 5)])
    s.add([mk("w", "w", 1), mk("v", "v", 0)])
    assert [it.id for it in s.items()] == ["v", "y", "w", "x", "z"]
    assert s.count() == 5
    assert [it.id for it in s.get(["z", "nope", "v"])] == ["z", "v"]


def test_add_is_idempotent_and_conflicts_change_nothing(store):
    assert store.add([mk("a", "my kitten likes to purr on the sofa", 1)]) == 0
    assert store.add([mk("f", "sunny", 6), mk("f", "sunny", 6)]) == 1  # duplicate within a batch
    before = store.items()
    with pytest.raises(ValueError, match="'a'"):
        store.add([mk("g", "new item", 7), mk("a", "edited text", 1)])
    with pytest.raises(ValueError, match="'b'"):
        store.add([mk("b", "the stock market and shares went down", 99)])  # same text, other time
    assert store.items() == before and store.get(["g"]) == []


def test_bm25_ranks_lexical_match_first(store):
    got = BM25Retriever(text_of).retrieve(store, "stock market news", 2)
    assert got[0].id == "b" and len(got) == 2
    assert BM25Retriever(text_of).retrieve(store, "PIZZA!", 1)[0].id == "e"  # case, punctuation


def test_dense_finds_synonyms_bm25_cannot(store):
    got = DenseRetriever().retrieve(store, "a feline", 1)
    assert [it.id for it in got] == ["a"]
    scored = store.dense_search("weather", 5)
    assert scored[0][0].id == "d"
    assert [s for _, s in scored] == sorted((s for _, s in scored), reverse=True)


@pytest.mark.parametrize("kind", ["bm25", "dense", "hybrid"])
def test_before_restricts_strictly_to_earlier_items(store, kind):
    r = make_retriever(kind, text_of)
    order = [it.id for it in store.items()]
    for i in range(len(order) + 2):
        got = r.retrieve(store, "pizza kitten stock rain lasagna", 10, before=i)
        assert {it.id for it in got} == set(order[:i])  # k is large: exactly the earlier items
    assert r.retrieve(store, "italian pizza", 3, before=0) == []
    # The lexically best item is "e" (last); restricted to the first 3 it cannot appear.
    assert "e" not in [it.id for it in r.retrieve(store, "italian pizza", 3, before=3)]


@pytest.mark.parametrize("kind", ["bm25", "dense", "hybrid"])
def test_k_zero_and_empty_store(store, kind):
    r = make_retriever(kind, text_of)
    assert r.retrieve(store, "pizza", 0) == []
    assert r.retrieve(store, "pizza", -1) == []
    assert r.retrieve(InMemoryHistoryStore(text_of, fake_embed), "pizza", 3) == []


def test_hybrid_is_reciprocal_rank_fusion(store):
    query = "feline kitty cat stock"  # BM25 only sees "stock" (b); dense sees the cat words (a)
    bm25 = [it.id for it in BM25Retriever(text_of).retrieve(store, query, 5)]
    dense = [it.id for it in DenseRetriever().retrieve(store, query, 5)]
    assert (bm25[0], dense[0]) == ("b", "a")
    fused = {i: 1 / (K_RRF + bm25.index(i) + 1) + 1 / (K_RRF + dense.index(i) + 1) for i in bm25}
    expected = sorted(fused, key=lambda i: -fused[i])
    got = [it.id for it in HybridRetriever(text_of).retrieve(store, query, 5)]
    assert got == expected
    assert set(got[:2]) == {"a", "b"}  # each ranker's best survives fusion


def test_ties_are_deterministic_recent_first():
    s = InMemoryHistoryStore(text_of, fake_embed)
    s.add([mk("old", "same words here", 1), mk("new", "same words here", 2), mk("x", "other", 0)])
    for kind in ("bm25", "dense", "hybrid"):
        got = [it.id for it in make_retriever(kind, text_of).retrieve(s, "same words", 2)]
        assert got == ["new", "old"], kind


def test_bm25_cache_sees_new_items_and_clear():
    s = InMemoryHistoryStore(text_of)
    r = BM25Retriever(text_of)
    s.add([mk("a", "apples and pears"), mk("b", "bananas")])
    assert r.retrieve(s, "cherries", 1, before=2)[0].id in {"a", "b"}
    s.add([mk("c", "cherries cherries", -1)])  # sorts first: ranks of the others shift
    assert r.retrieve(s, "cherries", 1, before=2)[0].id == "c"
    assert r.retrieve(s, "cherries", 1)[0].id == "c"
    s.clear()
    s.add([mk("x", "cherries"), mk("y", "plums"), mk("z", "figs")])  # same count as before
    assert r.retrieve(s, "cherries", 1)[0].id == "x"
    assert s.get_profile() is None


def test_bm25_handles_empty_texts():
    s = InMemoryHistoryStore(text_of)
    s.add([mk("a", ""), mk("b", "  ...  ")])
    assert [it.id for it in BM25Retriever(text_of).retrieve(s, "anything", 5)] == ["b", "a"]


def test_dense_without_embedder_is_a_clear_error():
    s = InMemoryHistoryStore(text_of)
    s.add([mk("a", "x")])
    with pytest.raises(RuntimeError, match="embed"):
        DenseRetriever().retrieve(s, "x", 1)


def test_profile_round_trip():
    s = InMemoryHistoryStore(text_of)
    assert s.get_profile() is None
    s.set_profile("likes pizza")
    assert s.get_profile() == "likes pizza"


def test_make_retriever_rejects_unknown_kind():
    with pytest.raises(ValueError, match="bm25, dense, hybrid"):
        make_retriever("tfidf", text_of)
    assert isinstance(make_retriever("bm25", text_of), BM25Retriever)
