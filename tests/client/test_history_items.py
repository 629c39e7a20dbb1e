"""History items as a person gives them: ratings as numbers, stored in the task's spelling (the
same rule as the importers); a field the task does not have refused with the ones it has; one
item deleted from the store, the ClientApp's snapshot and the next training; and errors that say
exactly what of a refused batch was stored (nothing)."""

from __future__ import annotations

import errno
import json

import pytest
from fastapi.testclient import TestClient

from client.api import create_app
from client.items import ItemError, parse_items
from client.service import ClientService
from client.settings import DaemonSpec
from client.snapshot import read_snapshot, snapshot_path
from shared.config import SelectionSpec, TrainSpec
from shared.data.importers import import_jsonl
from shared.records import HistoryItem
from shared.tasks import get_task

from in_process_cli import in_process_cli

TOKEN = "t" * 43
RATING = get_task("amazon-rating")
TEXT = "Great strings, they stay in tune for weeks."


def _item(i: int, score: object = "5", **extra: object) -> dict:
    return {"id": f"r{i}", "fields": {"text": f"{TEXT} ({i})", "score": score, **extra}, "time": i + 1}


def test_ratings_given_as_numbers_are_stored_as_the_tasks_label():
    given = [_item(0, 5), _item(1, 5.0), _item(2, "5.0"), _item(3, " 4 "), _item(4, 1)]
    stored = parse_items(given, RATING, max_field_chars=1000)
    assert [it.fields["score"] for it in stored] == ["5", "5", "5", "4", "1"]  # RATINGS' spelling
    assert all(it.fields["score"] in RATING.labels for it in stored)
    # A number in a text field is its text as written, as the importers read it.
    assert parse_items([{"id": "n", "fields": {"text": 2024, "score": 3}}], RATING,
                       max_field_chars=1000)[0].fields == {"text": "2024", "score": "3"}
    for bad, why in [(5.5, "not a whole number 1-5"), (9, "not a whole number 1-5"), (True, "text or a number"),
                     (None, "text or a number"), ([5], "text or a number")]:
        with pytest.raises(ItemError, match=why) as e:
            parse_items([_item(0, bad)], RATING, max_field_chars=1000)
        assert e.value.loc[:4] == ("items", 0, "fields", "score"), e.value.loc
    # One rule in one place: the importers store the same spelling for the same values.
    tag = get_task("synthetic-tag")
    assert parse_items([{"id": "t", "fields": {"description": "a film", "tag": " comedy "}}], tag,
                       max_field_chars=1000)[0].fields["tag"] == "comedy"


def test_the_importers_store_what_the_daemon_stores(tmp_path):
    src = tmp_path / "reviews.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "text": f"{TEXT} ({i})", "score": s}) + "\n"
                           for i, s in enumerate([5, 5.0, "5.0", " 4 "])))
    imported = import_jsonl(src, RATING).items
    daemon = parse_items([{"id": it.id, "fields": {"text": it.fields["text"], "score": s}}
                          for it, s in zip(imported, [5, 5.0, "5.0", " 4 "])], RATING, max_field_chars=1000)
    assert [it.fields for it in imported] == [it.fields for it in daemon]
    assert [it.fields["score"] for it in imported] == ["5", "5", "5", "4"]


def test_a_field_the_task_does_not_have_is_refused_naming_the_allowed_ones():
    with pytest.raises(ItemError) as e:
        parse_items([_item(0), _item(1, "4", stars="4")], RATING, max_field_chars=1000)
    assert e.value.loc == ("items", 1, "fields", "stars")
    assert "item 'r1' has field 'stars', which amazon-rating items do not have; allowed fields: text, score" in e.value.msg


# --------------------------------------------------------------------------- through the API and the CLI


@pytest.fixture(scope="module")
def service(tiny_engine, tmp_path_factory):
    spec = DaemonSpec(task="amazon-rating", retrain_after=0, personal_train=TrainSpec(epochs=1, lr=2e-2, batch_size=4),
                      selection=SelectionSpec(enabled=False))
    svc = ClientService(spec, tmp_path_factory.mktemp("items") / "dir", engine=tiny_engine)
    yield svc
    svc.close()
    tiny_engine.reset_personal()


@pytest.fixture
def api(service):
    service.forget()  # each test starts from an empty history
    client = TestClient(create_app(service, TOKEN), base_url="http://127.0.0.1",
                        headers={"Authorization": f"Bearer {TOKEN}"})
    yield client


@pytest.fixture
def run_cli(api, monkeypatch, capsys):
    """`oppu client ...` in-process, its requests going to the app under test."""
    return in_process_cli(api, monkeypatch, capsys)


def test_numbers_through_the_api_are_stored_as_labels(api, service):
    r = api.post("/v1/history", json={"items": [_item(0, 5), _item(1, 4.0), _item(2, "3.0")]})
    assert r.status_code == 200, r.text
    assert [it.fields["score"] for it in service.store.items()] == ["5", "4", "3"]
    schema = api.get("/openapi.json").json()["components"]["schemas"]["ItemIn"]["properties"]["fields"]
    assert schema["additionalProperties"] is False
    assert {"type": "integer", "minimum": 1, "maximum": 5} in schema["properties"]["score"]["anyOf"]


def test_a_refused_batch_says_nothing_of_it_was_stored(api, service, run_cli, tmp_path):
    r = api.post("/v1/history", json={"items": [_item(0), _item(1, "4", stars="4")]})
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "items", 1, "fields", "stars"]
    assert "allowed fields: text, score" in err["msg"] and "nothing of it was stored" in err["msg"]
    assert service.count() == 0
    # The CLI: the first batch refused -> nothing stored; a later one -> exactly the batches before it.
    path = tmp_path / "h.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in [_item(0), _item(1), _item(2, "4", stars="4"), _item(3)]))
    rc, _, err = run_cli("add", str(path), "--batch", "4")
    assert rc == 2 and service.count() == 0
    assert f"nothing was stored: the batch of items 0-3 of {path} was refused whole" in err, err
    assert "were stored" not in err
    rc, _, err = run_cli("add", str(path), "--batch", "2")
    assert rc == 2 and service.count() == 2
    assert (f"nothing of items 2-3 of {path} was stored (a refused batch is refused whole); items 0-1 were stored "
            "before it (2 new, 0 already present). Fix it") in err, err


def test_deleting_one_item_removes_it_from_the_store_the_snapshot_and_the_next_training(api, service, run_cli):
    assert api.post("/v1/history", json={"items": [_item(i, str(1 + i % 5)) for i in range(8)]}).status_code == 200
    r = api.delete("/v1/history/r3")
    assert r.status_code == 200, r.text
    assert r.json() == {"deleted": "r3", "history_count": 7, "profile_removed": False, "personal_version": None}
    ids = [f"r{i}" for i in range(8) if i != 3]
    assert [it.id for it in service.store.items()] == ids
    assert [it.id for it in read_snapshot(snapshot_path(service.store.path)).items] == ids  # what a round reads
    assert api.get("/v1/history").json()["total"] == 7
    r = api.delete("/v1/history/r3")
    assert r.status_code == 404 and "no history item 'r3'" in r.json()["detail"]
    # The next training reads 7 items (and the one it publishes says so).
    job = service.train()
    done = service.jobs.wait(job.id, 120)
    assert done.state == "succeeded", done.error
    assert done.result["history_items"] == 7 and service.status()["personal_adapter"]["data"]["history_items"] == 7
    # The CLI, with an id that needs quoting in a URL; it says that the adapter in use predates it.
    weird = HistoryItem("a/b c?d", {"text": TEXT, "score": "2"}, 99)
    service.add([weird])
    rc, out, err = run_cli("delete", weird.id)
    assert rc == 0 and "deleted 'a/b c?d'; history now holds 7 items" in out
    assert "personal adapter v1 was trained before the deletion" in err
    assert weird.id not in {it.id for it in service.store.items()}
    rc, _, err = run_cli("delete", "nope")
    assert rc == 2 and "404: no history item 'nope'" in err


def test_a_retried_delete_repairs_a_snapshot_whose_write_failed(api, service, monkeypatch):
    import client.service as service_module

    assert api.post("/v1/history", json={"items": [_item(0), _item(1)]}).status_code == 200
    snap = snapshot_path(service.store.path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(service_module, "write_snapshot", disk_full)
    r = api.delete("/v1/history/r0")
    assert r.status_code == 507 and "nothing of this request was acknowledged" in r.json()["detail"]
    monkeypatch.undo()
    assert [it.id for it in read_snapshot(snap).items] == ["r0", "r1"]  # the store lost it, the copy did not
    r = api.delete("/v1/history/r0")  # the client's retry
    assert r.status_code == 404
    assert [it.id for it in read_snapshot(snap).items] == ["r1"] == [it.id for it in service.store.items()]
