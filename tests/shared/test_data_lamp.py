"""LaMP-format reading and writing: real file shapes, round trips, errors naming file/record/field."""

from __future__ import annotations

import json
import re

import pytest

from shared.data import load_lamp_dataset, read_lamp, write_lamp, write_predictions
from shared.records import HistoryItem, Query, UserData
from shared.tasks import get_task

LAMP3_INPUT = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
               "without further explanation. review: {}")


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def lamp3_files(tmp_path, split="dev", profile=None, golds=True):
    profile = profile or [
        {"text": "second", "score": "2", "id": "p2", "date": "2014-03-02"},
        {"text": "first", "score": "5", "id": "p1", "date": "2014-03-01"},
    ]
    write_json(tmp_path / f"{split}_questions.json", [
        {"id": "310", "input": LAMP3_INPUT.format("Works."), "profile": profile},
        {"id": 311, "input": LAMP3_INPUT.format("Broke."), "profile": [{"text": "only", "score": "3", "id": "p9"}]},
    ])
    if golds:
        write_json(tmp_path / f"{split}_outputs.json",
                   {"task": "LaMP_3", "golds": [{"id": "310", "output": "4"}, {"id": "311", "output": "1"}]})


def test_reads_real_lamp_shape(tmp_path):
    lamp3_files(tmp_path)
    users = read_lamp(tmp_path, "dev", "LaMP-3")
    assert [u.user_id for u in users] == ["310", "311"]
    u = users[0]
    assert [h.id for h in u.history] == ["p1", "p2"]  # sorted by date, oldest first
    assert u.history[0].time < u.history[1].time
    assert u.history[0].fields == {"text": "first", "score": "5"}
    assert u.queries == [Query("310", LAMP3_INPUT.format("Works."), "4")]
    assert users[1].queries[0].id == "311" and users[1].history[0].time == 0


def test_no_outputs_file_means_no_targets(tmp_path):
    lamp3_files(tmp_path, split="test", golds=False)
    assert all(q.target is None for u in read_lamp(tmp_path, "test", "LaMP-3") for q in u.queries)


def test_undated_profile_keeps_file_order(tmp_path):
    lamp3_files(tmp_path, profile=[{"text": "b", "score": "1", "id": "x"}, {"text": "a", "score": "2", "id": "y"}])
    hist = read_lamp(tmp_path, "dev", "LaMP-3")[0].history
    assert [(h.id, h.time) for h in hist] == [("x", 0), ("y", 1)]


def test_write_read_round_trip(tmp_path):
    task = get_task("synthetic-tag")
    items = [HistoryItem(f"h{i}", {"description": f"film {i}", "tag": "comedy"}, time=i) for i in range(3)]
    users = [
        UserData("u1", items, [Query("q1", "in 1", "romance"), Query("q2", "in 2", "comedy")], profile_text="likes fun"),
        UserData("u2", items[:1], [Query("q3", "in 3", "action")]),
    ]
    write_lamp(tmp_path, "dev", users, task)
    write_lamp(tmp_path, "train", users[1:], task)
    assert read_lamp(tmp_path, "dev", task) == users
    ds = load_lamp_dataset(tmp_path, "synthetic-tag")
    assert ds.eval_users == users and ds.base_users == users[1:] and ds.task == "synthetic-tag"
    golds = json.loads((tmp_path / "dev_outputs.json").read_text())
    assert golds == {"task": "synthetic-tag", "golds": [{"id": "q1", "output": "romance"},
                                                        {"id": "q2", "output": "comedy"},
                                                        {"id": "q3", "output": "action"}]}
    assert not list(tmp_path.glob("*.tmp"))


def test_write_lamp_refuses_invalid_data(tmp_path):
    bad = [UserData("u1", [HistoryItem("h", {"text": "t", "score": "9"})], [Query("q", "in", "3")])]
    with pytest.raises(ValueError, match=r"dev_questions.json: user 'u1' history: item 'h' field 'score'"):
        write_lamp(tmp_path, "dev", bad, "LaMP-3")
    assert not (tmp_path / "dev_questions.json").exists()


def test_write_predictions_is_lamp_outputs_format(tmp_path):
    path = write_predictions(tmp_path / "preds" / "OPPU.json", "LaMP-3", {"310": "4", "311": "1"})
    assert json.loads(path.read_text()) == {"task": "LaMP-3", "golds": [{"id": "310", "output": "4"},
                                                                         {"id": "311", "output": "1"}]}


def test_error_names_file_record_and_field(tmp_path):
    q = write_json(tmp_path / "dev_questions.json", [
        {"id": "1", "input": "x", "profile": []},
        {"id": "2", "profile": []},
    ])
    with pytest.raises(ValueError, match=re.escape(f"{q}: record 1 (id '2'): missing field 'input'")):
        read_lamp(tmp_path, "dev", "LaMP-3")


def test_error_names_profile_item_and_field(tmp_path):
    lamp3_files(tmp_path, profile=[{"text": "ok", "score": "5", "id": "a"}, {"text": "ok", "score": "great", "id": "b"}])
    with pytest.raises(ValueError, match=r"dev_questions.json: record 0 \(id '310'\): profile\[1\]: item 'b' field 'score'.*1-5"):
        read_lamp(tmp_path, "dev", "LaMP-3")
    lamp3_files(tmp_path, profile=[{"score": "5", "id": "a"}])
    with pytest.raises(ValueError, match=r"profile\[0\]: item 'a' has no field 'text'; LaMP-3 items need: text, score"):
        read_lamp(tmp_path, "dev", "LaMP-3")


def test_error_for_missing_or_bad_gold(tmp_path):
    lamp3_files(tmp_path)
    out = write_json(tmp_path / "dev_outputs.json", {"task": "LaMP_3", "golds": [{"id": "310", "output": "4"}]})
    with pytest.raises(ValueError, match=re.escape(f"{out}: no gold output for question id '311'")):
        read_lamp(tmp_path, "dev", "LaMP-3")
    write_json(out, {"task": "LaMP_3", "golds": [{"id": "310", "output": "4"}, {"id": "311", "output": "six"}]})
    with pytest.raises(ValueError, match=r"gold for id '311' field 'output': rating 'six'"):
        read_lamp(tmp_path, "dev", "LaMP-3")


def test_bad_json_and_missing_file(tmp_path):
    (tmp_path / "dev_questions.json").write_text("[{")
    with pytest.raises(ValueError, match=r"dev_questions.json: not valid JSON \(line 1"):
        read_lamp(tmp_path, "dev", "LaMP-3")
    with pytest.raises(FileNotFoundError, match=r"train_questions.json"):
        read_lamp(tmp_path, "train", "LaMP-3")
