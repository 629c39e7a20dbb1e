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
    assert json.loads(path.read_text()) == {"task": "LaMP_3", "golds": [{"id": "310", "output": "4"},
                                                                         {"id": "311", "output": "1"}]}


# What LaMP's evaluator (LaMP-Benchmark/LaMP eval/evaluation.py, LaMPEvaluation.evaluate_task)
# checks and computes, restated here because it needs the `evaluate` library and a model hub.
# Task names as LaMP spells them; LaMP_2 is movie tagging in LaMP's current release. News
# categorization is no LaMP task any more: LaMP_2N and its labels are OPPU's evaluator's.
LAMP_NAMES = {"LaMP-1": "LaMP_1", "LaMP-2M": "LaMP_2", "LaMP-2N": "LaMP_2N", "LaMP-3": "LaMP_3",
              "LaMP-4": "LaMP_4", "LaMP-5": "LaMP_5", "LaMP-7": "LaMP_7"}
LAMP_LABELS = {
    "LaMP_1": ["[1]", "[2]"],
    "LaMP_2": ["sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
               "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story"],
    "LaMP_2N": ["food & drink", "sports", "education", "parents", "religion", "travel", "business", "crime",
                "science & technology", "culture & arts", "entertainment", "politics", "women", "style & beauty",
                "healthy living"],
}


def lamp_evaluate_task(golds_json, preds_json, task_name):
    """LaMPEvaluation(single_gold_json_file_addr=golds_json).evaluate_task(preds_json, task_name)."""
    import numpy as np

    golds_file = json.loads(golds_json.read_text())
    tasks_golds = {golds_file["task"]: golds_file["golds"]}
    preds = json.loads(preds_json.read_text())
    assert preds["task"] == task_name, "The provided task_name and the results do not match."
    assert preds["task"] in tasks_golds, "The provided golds cannot be used to evaluate this task."
    golds_dict = {y["id"]: y["output"] for y in tasks_golds[task_name]}
    preds_dict = {x["id"]: x["output"] for x in preds["golds"]}
    assert set(golds_dict) == set(preds_dict), "Predictions ids and gold ids do not match."
    ids = list(golds_dict)
    p, g = [str(preds_dict[i]).strip() for i in ids], [str(golds_dict[i]).strip() for i in ids]
    if task_name in LAMP_LABELS:  # evaluate's "accuracy" and "f1" (sklearn, macro over all labels)
        from sklearn.metrics import f1_score

        labels = LAMP_LABELS[task_name]
        pi = [labels.index(x) if x in labels else -1 for x in p]
        gi = [labels.index(x) if x in labels else -1 for x in g]
        return {"accuracy": float(np.mean(np.array(pi) == np.array(gi))),
                "f1": f1_score(gi, pi, labels=list(range(len(labels))), average="macro")}
    if task_name == "LaMP_3":  # evaluate's "mae" and "mse" (squared=False)
        def number(x, y):
            try:
                return float(x)
            except ValueError:
                return 1.0 if abs(1 - float(y)) > abs(5 - float(y)) else 5.0

        err = np.array([number(x, y) for x, y in zip(p, g)]) - np.array([number(y, y) for y in g])
        return {"MAE": float(np.mean(np.abs(err))), "RMSE": float(np.sqrt(np.mean(err**2)))}
    # evaluate's "rouge": rouge_score, no stemmer, one reference per prediction, and
    # use_aggregator=True: the median of 1000 bootstrap resamples' means ("mid"), with its 95% band.
    from rouge_score import rouge_scorer, scoring

    scorer, agg = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False), scoring.BootstrapAggregator()
    for x, y in zip(p, g):
        agg.add_scores(scorer.score_multi([y], x))
    out = agg.aggregate()
    return {"rouge-1": out["rouge1"].mid.fmeasure, "rouge-L": out["rougeL"].mid.fmeasure,
            "band": {k: (out[k].low.fmeasure, out[k].high.fmeasure) for k in ("rouge1", "rougeL")}}


def _lamp_users(task, n=8):
    """n users with one query each, valid for `task`, and predictions right, wrong and malformed."""
    words = "deep personal models learn each user's style from their own history".split()
    answers = list(task.labels) if task.labels else [" ".join(words[i % 5 : i % 5 + 4]) for i in range(n)]
    users, preds = [], {}
    for i in range(n):
        fields = {f: (answers[0] if f == task.label_field else f"{f} of item {i}") for f in task.item_fields}
        gold = answers[(3 * i) % len(answers)]
        users.append(UserData(f"u{i}", [HistoryItem(f"h{i}", fields, time=i)], [Query(f"{300 + i}", f"input {i}", gold)]))
        preds[f"{300 + i}"] = [gold, answers[(3 * i + 1) % len(answers)], "  " + gold + " ", "no idea"][i % 4]
    return users, preds


@pytest.mark.parametrize("name", ["LaMP-1", "LaMP-2M", "LaMP-2N", "LaMP-3", "LaMP-5"])
def test_lamp_evaluator_reads_our_predictions(tmp_path, name):
    """Golds written by write_lamp and predictions by write_predictions (as `oppu experiment`
    writes them) pass LaMP's checks, and LaMP's figures are ours."""
    import numpy as np

    task = get_task(name)
    users, preds = _lamp_users(task)
    _, golds_json = write_lamp(tmp_path, "dev", users, task)
    preds_json = write_predictions(tmp_path / "predictions" / "OPPU.json", task.name, preds)
    lamp_name = LAMP_NAMES[name]
    theirs = lamp_evaluate_task(golds_json, preds_json, lamp_name)
    ours = task.score([preds[q.id] for u in users for q in u.queries], [q.target for u in users for q in u.queries])
    if lamp_name in LAMP_LABELS:
        assert set(task.labels) == set(LAMP_LABELS[lamp_name])
        assert ours == pytest.approx(theirs) and 0 < ours["accuracy"] < 1
    elif lamp_name == "LaMP_3":
        assert ours == pytest.approx({"mae": theirs["MAE"], "rmse": theirs["RMSE"]}) and ours["mae"] > 0
    else:
        # Ours is the mean over queries; LaMP's the median of bootstrap means: not the same
        # number, but within its own bootstrap band, and close (docs/simulations.md).
        for ours_key, key in (("rouge-1", "rouge1"), ("rouge-L", "rougeL")):
            low, high = theirs["band"][key]
            assert low <= ours[ours_key] <= high and 0 < ours[ours_key] < 1
            assert abs(theirs[ours_key] - ours[ours_key]) <= (high - low) / 4
    # What LaMP refuses: a predictions file under another task's name, or other ids.
    with pytest.raises(AssertionError, match="task_name and the results"):
        lamp_evaluate_task(golds_json, preds_json, name if name != lamp_name else "LaMP_6")
    partial = write_predictions(tmp_path / "partial.json", task.name, dict(list(preds.items())[1:]))
    with pytest.raises(AssertionError, match="ids do not match"):
        lamp_evaluate_task(golds_json, partial, lamp_name)
    assert np.isfinite(list(ours.values())).all()


@pytest.mark.parametrize("name", ["LaMP-2M", "LaMP-2N", "LaMP-5"])
def test_golds_read_under_every_spelling_of_their_task(tmp_path, name):
    """Our golds, LaMP's, OPPU's and LaMP's first release's name the task differently; all read.
    Golds of another task do not."""
    task = get_task(name)
    users, _ = _lamp_users(task, n=2)
    _, golds_json = write_lamp(tmp_path, "dev", users, task)
    assert json.loads(golds_json.read_text())["task"] == LAMP_NAMES[name]
    spellings = {"LaMP-2M": ["LaMP-2M", "LaMP_2", "LaMP_2M"], "LaMP-2N": ["LaMP-2N", "LaMP_2N", "LaMP_2"],
                 "LaMP-5": ["LaMP-5", "LaMP_5"]}[name]
    golds = json.loads(golds_json.read_text())
    for spelling in spellings:
        write_json(golds_json, {**golds, "task": spelling})
        assert read_lamp(tmp_path, "dev", task) == users
    write_json(golds_json, {**golds, "task": "LaMP_4"})
    with pytest.raises(ValueError, match=r"dev_outputs.json: field 'task' is 'LaMP_4'"):
        read_lamp(tmp_path, "dev", task)


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
