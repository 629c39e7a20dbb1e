"""The daemon's history snapshot for the ClientApp: exact round trip, refused when damaged, and
read (with dense retrieval) without Chroma."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from client.snapshot import Snapshot, SnapshotError, read_snapshot, snapshot_store, write_snapshot
from shared.records import HistoryItem

ITEMS = (HistoryItem("a", {"text": "Spaghetti carbonara with guanciale ✓", "score": "5"}, 10),
         HistoryItem("b", {"text": "Thunderstorms flooded the streets downtown", "score": "3"}, 10),
         HistoryItem("c", {"text": "Our kitten sleeps on the keyboard", "score": "4"}, 30))


def test_round_trip_keeps_items_order_and_profile(tmp_path):
    path = write_snapshot(tmp_path / "history" / "history.snapshot.jsonl", ITEMS, task="t", profile="likes pasta")
    assert read_snapshot(path) == Snapshot("t", "likes pasta", ITEMS)
    assert path.stat().st_mode & 0o077 == 0  # the user's history: owner only
    store = snapshot_store(read_snapshot(path), lambda it: it.fields["text"], retriever="bm25")
    assert store.items() == list(ITEMS) and store.get_profile() == "likes pasta"  # equal times keep their order
    write_snapshot(path, (), task="t", profile=None)  # forget's snapshot
    assert read_snapshot(path) == Snapshot("t", None, ())
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-1], "does not end with a newline"),
    (lambda b: b[: b.rindex(b"\n", 0, len(b) - 1) + 1], "'count' is 3 but the file holds 2 items"),
    (lambda b: b.replace(b'"time": 30', b'"time": "30"'), "line 4: 'id' must be a string and 'time' an integer"),
    (lambda b: b.replace(b'"score": "4"', b'"score": 4'), "line 4: 'fields' must map strings to strings"),
    (lambda b: b.replace(b'"version": 1', b'"version": 2'), "line 1: format 'oppu-history-snapshot' version 2"),
    (lambda b: b.replace(b'"id": "b"', b'"id": "a"'), "an item id occurs twice"),
    (lambda b: b"", "line 1: not JSON"),
])
def test_a_damaged_snapshot_is_refused_with_the_line_at_fault(tmp_path, damage, message):
    path = write_snapshot(tmp_path / "s.jsonl", ITEMS, task="t", profile=None)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SnapshotError, match=message):
        read_snapshot(path)


READ_LIKE_THE_CLIENTAPP = """
import sys
from client.userdir import UserDir
from shared.tasks import get_task

store = UserDir(sys.argv[1]).open_store(get_task("synthetic-tag"), store="chroma", retriever=sys.argv[2])
print(len(store.items()), type(store._embed).__name__, "chromadb" in sys.modules)
"""


def test_the_clientapp_reads_and_embeds_the_snapshot_without_chroma(tmp_path):
    """Even when the run names the Chroma store: the ClientApp takes the snapshot, in memory, with
    MiniLM embeddings of its own for dense retrieval, and never imports chromadb."""
    from client.userdir import UserDir
    from shared.tasks import get_task

    items = [HistoryItem(it.id, {"description": it.fields["text"], "tag": "comedy"}, it.time) for it in ITEMS]
    write_snapshot(tmp_path / "history" / "history.snapshot.jsonl", items, task="synthetic-tag", profile=None)
    out = subprocess.run([sys.executable, "-c", READ_LIKE_THE_CLIENTAPP, str(tmp_path), "dense"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["3", "MiniLMEmbedder", "False"]
    store = UserDir(tmp_path).open_store(get_task("synthetic-tag"), store="chroma", retriever="dense")
    assert store.dense_search("a kitten on my keyboard", 1)[0][0].id == "c"
    with pytest.raises(Exception, match="task 'synthetic-tag', the run is 'LaMP-3'"):
        UserDir(tmp_path).open_store(get_task("LaMP-3"), store="chroma", retriever="bm25")
