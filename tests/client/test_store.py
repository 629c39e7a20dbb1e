"""ChromaHistoryStore on real Chroma with the real MiniLM, with the network forbidden."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import client.store
from client.store import ChromaHistoryStore
from shared.records import HistoryItem
from shared.retrieval import HistoryStore, make_retriever


def text_of(item: HistoryItem) -> str:
    return item.fields["text"]


def mk(id_: str, text: str, time: int, **extra: str) -> HistoryItem:
    return HistoryItem(id=id_, fields={"text": text, **extra}, time=time)


HISTORY = [
    mk("r1", "Spaghetti carbonara with guanciale was the best dinner I cooked this year", 10, score="5"),
    mk("r2", "The quarterly earnings report sent the share price down twelve percent", 20, score="2"),
    mk("r3", "Our new kitten sleeps on the keyboard whenever I try to work", 30, score="4"),
    mk("r4", "Heavy thunderstorms flooded the streets downtown last night", 40, score="3"),
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection other than loopback or a Unix socket fails the test."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def allowed(sock: socket.socket, address: object) -> bool:
        if sock.family == socket.AF_UNIX:
            return True
        host = address[0] if isinstance(address, tuple) else str(address)
        return host in ("127.0.0.1", "::1", "localhost")

    def connect(sock, address):
        if not allowed(sock, address):
            raise AssertionError(f"network access attempted: {address!r}")
        return real_connect(sock, address)

    def connect_ex(sock, address):
        if not allowed(sock, address):
            raise AssertionError(f"network access attempted: {address!r}")
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


@pytest.fixture
def store(tmp_path):
    s = ChromaHistoryStore(tmp_path / "db", text_of)
    yield s
    s.close()


def test_persists_across_reopen(tmp_path):
    path = tmp_path / "db"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = ChromaHistoryStore(path, text_of)
        assert isinstance(s, HistoryStore)
        assert s.add(HISTORY) == 4
        s.set_profile("Enjoys Italian cooking; writes short, upbeat reviews. ✓")
        s.close()
    # Our embedding function is a registered, non-legacy one: Chroma has nothing to warn about.
    assert not [w for w in caught if "legacy" in str(w.message).lower() or "embedding" in str(w.message).lower()]

    with ChromaHistoryStore(path, text_of) as again:
        assert again.items() == HISTORY  # fields, time and order survive, including extra fields
        assert again.count() == 4
        assert again.get_profile() == "Enjoys Italian cooking; writes short, upbeat reviews. ✓"
        assert again.dense_search("pasta recipe", 1)[0][0].id == "r1"
        # The collection remembers its embedding function by name, never Chroma's default one.
        assert again._col.configuration["embedding_function"].name() == "oppu-all-minilm-l6-v2"


def test_dense_search_finds_the_semantic_match(store):
    store.add(HISTORY)
    hits = store.dense_search("my cat is adorable", 4)
    assert hits[0][0].id == "r3"
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0
    assert [it.id for it in make_retriever("dense", text_of).retrieve(store, "stock market losses", 1)] == ["r2"]
    assert make_retriever("hybrid", text_of).retrieve(store, "rain storm weather", 1)[0].id == "r4"


def test_before_restricts_to_earlier_items_even_after_older_inserts(store):
    store.add(HISTORY)
    assert [it.id for it, _ in store.dense_search("kitten", 4, before=2)] in (["r1", "r2"], ["r2", "r1"])
    assert store.dense_search("kitten", 3, before=0) == []
    # An item older than everything shifts every rank by one; `before` must follow.
    early = mk("r0", "Adopted a fluffy kitten from the shelter", 5, score="5")
    assert store.add([early]) == 1
    assert [it.id for it in store.items()] == ["r0", "r1", "r2", "r3", "r4"]
    assert [it.id for it, _ in store.dense_search("kitten", 5, before=1)] == ["r0"]
    got = {it.id for it, _ in store.dense_search("kitten", 5, before=3)}
    assert got == {"r0", "r1", "r2"}
    assert store.dense_search("kitten", 1)[0][0].id in {"r0", "r3"}


def test_add_is_idempotent_and_conflict_changes_nothing(store, monkeypatch):
    # A tiny batch limit exercises the batching path without thousands of items.
    monkeypatch.setattr(store._client, "get_max_batch_size", lambda: 2)
    assert store.add(HISTORY[:3]) == 3
    assert store.add(HISTORY) == 1  # only r4 is new
    assert store.add(HISTORY) == 0
    snapshot = store.items()
    with pytest.raises(ValueError, match="'r2'"):
        store.add([mk("r5", "brand new", 50), mk("r2", "edited review text", 20, score="2")])
    assert store.items() == snapshot and store.get(["r5"]) == []
    assert store._col.count() == 4  # nothing reached Chroma either


def test_profile_round_trip_and_clear(store, tmp_path):
    assert store.get_profile() is None
    store.set_profile("first")
    store.set_profile("second")
    assert store.get_profile() == "second"
    assert not [p for p in (tmp_path / "db").iterdir() if p.name.endswith(".tmp")]
    store.add(HISTORY)
    store.clear()
    assert store.count() == 0 and store.items() == [] and store.get_profile() is None
    assert store.add(HISTORY[:1]) == 1
    assert store.dense_search("dinner", 3)[0][0].id == "r1"


# Another process opening the store, as the SuperNode's ClientApp did: prints the count it sees.
OPEN_IN_ANOTHER_PROCESS = """
import sys
from client.store import ChromaHistoryStore
s = ChromaHistoryStore(sys.argv[1], lambda it: it.fields["text"])
print("opened", s.count(), flush=True)
if sys.argv[2] == "hold":
    sys.stdin.read()  # keeps the store open until the test closes our stdin (or kills us)
s.close()
"""
REPO = Path(__file__).resolve().parents[2]


def _other_process(path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", OPEN_IN_ANOTHER_PROCESS, str(path), mode], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_one_owner_per_store_a_second_process_is_refused(tmp_path):
    path = tmp_path / "db"
    with ChromaHistoryStore(path, text_of) as s:
        s.add(HISTORY[:2])
        other = _other_process(path, "once")
        out, err = other.communicate(timeout=120)
        assert other.returncode != 0, f"a second process opened the store while it was open here: {out!r}"
        assert "StoreInUse" in err and f"pid {os.getpid()}" in err and "kill -TERM" in err, err[-2000:]
        # A second handle in this process is refused too, and the owner's store is untouched.
        with pytest.raises(client.store.StoreInUse, match="already open here"):
            ChromaHistoryStore(path, text_of)
        assert s.add(HISTORY[2:3]) == 1 and s.count() == 3

    # Closed: another process may own it now, and while it does, this one may not.
    holder = _other_process(path, "hold")
    try:
        assert holder.stdout.readline().split() == ["opened", "3"], holder.stderr.read()[-2000:]
        with pytest.raises(client.store.StoreInUse, match=rf"pid {holder.pid} \(.*\).*kill -TERM {holder.pid}"):
            ChromaHistoryStore(path, text_of)
        # The kernel drops a SIGKILLed owner's lock: the store opens again, with all it held.
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate()
    with ChromaHistoryStore(path, text_of) as again:
        assert again.items() == HISTORY[:3]


def test_wipe_keeps_ownership_and_leaves_only_the_lock(store, tmp_path):
    store.add(HISTORY)
    store.set_profile("likes pasta")
    store.wipe()
    assert store.count() == 0 and store.get_profile() is None
    assert sorted(p.name for p in (tmp_path / "db").iterdir() if p.name != "chroma.sqlite3") == ["owner.lock"]
    with pytest.raises(client.store.StoreInUse):
        ChromaHistoryStore(tmp_path / "db", text_of)
    assert store.add(HISTORY[:1]) == 1 and store.dense_search("dinner", 1)[0][0].id == "r1"


def test_a_handle_dropped_without_close_gives_up_ownership(tmp_path):
    import gc

    s = ChromaHistoryStore(tmp_path / "db", text_of)
    s.add(HISTORY[:1])
    del s
    gc.collect()
    with ChromaHistoryStore(tmp_path / "db", text_of) as again:
        assert again.count() == 1
