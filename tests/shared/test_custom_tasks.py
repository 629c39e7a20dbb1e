"""Tasks defined in a config file: [[tasks]] tables -> the same Task objects the built-in tasks
are (one registry), refused with messages naming the file, the task, the field and the allowed
values; `oppu tasks` shows every task's fields and an item line that can be added as it is."""

from __future__ import annotations

import json

import pytest

from shared.config import load_task_file
from shared.records import HistoryItem
from shared.tasks import BUILTIN_TASKS, TASKS, Task, get_task

CONFIG = '''
[[tasks]]
name = "mood-rating"
kind = "rating"
fields = ["entry", "mood"]
target = "mood"
instruction = "How did the writer feel, from 0 to 10? Answer with one number. diary entry: {entry}"
scale = [0, 10]
metric = "rmse"

[[tasks]]
name = "mail-folder"
kind = "classification"
fields = ["subject", "body", "folder"]
target = "folder"
instruction = "File this mail into one folder (work, family, bills). mail: {subject}. {body}"
labels = ["work", "family", "bills"]

[[tasks]]
name = "note-title"
kind = "generation"
fields = ["text", "title"]
target = "title"
instruction = "Write a title for this note: {text}"
description = "my notes -> my titles"
'''


@pytest.fixture(autouse=True)
def _registry():
    """Tasks registered by a test leave with it (the registry is one dict per process)."""
    saved = dict(TASKS)
    yield
    TASKS.clear()
    TASKS.update(saved)


def _write(tmp_path, text, name="tasks.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_config_task_is_a_task_that_renders_parses_and_scores(tmp_path):
    built = load_task_file(_write(tmp_path, CONFIG))
    assert [t.name for t in built] == ["mood-rating", "mail-folder", "note-title"]
    mood, mail, note = (get_task(n) for n in ("mood-rating", "mail-folder", "note-title"))
    assert all(type(t) is Task for t in (mood, mail, note))

    # rating: its own scale, the metric it names first, parsing and scoring on that scale
    assert mood.kind == "regression" and mood.labels == tuple(str(v) for v in range(11)) and mood.scale == (0, 10)
    assert mood.metric_names == ("rmse", "mae")
    item = HistoryItem("d1", {"entry": "Long walk by the sea, slept well.", "mood": "8.0"}, time=5)
    mood.validate_item(item, "test")
    question, answer = mood.item_to_example(item)
    assert question == "How did the writer feel, from 0 to 10? Answer with one number. diary entry: Long walk by the sea, slept well."
    assert answer == "8"
    assert mood.retrieval_query(question) == "Long walk by the sea, slept well."
    assert mood.parse_output("I'd say 10/10") == "10" and mood.parse_output("0") == "0"
    assert mood.parse_output("eleven") == "eleven"
    # an unparseable answer scores as the far end of *this* scale: gold 2 -> 10, error 8
    assert mood.score(["7", "eleven"], ["8", "2"]) == pytest.approx({"mae": 4.5, "rmse": (65 / 2) ** 0.5})
    with pytest.raises(ValueError, match=r"rating '11' is not a whole number 0-10"):
        mood.validate_item(HistoryItem("d2", {"entry": "x", "mood": "11"}), "test")

    # classification: its labels, parsed from chatty answers, scored by accuracy and macro-F1
    assert mail.labels == ("work", "family", "bills") and mail.label_field == "folder"
    mail_item = HistoryItem("m1", {"subject": "Invoice 12", "body": "Due Friday.", "folder": "bills"})
    assert mail.make_input(mail_item) == "File this mail into one folder (work, family, bills). mail: Invoice 12. Due Friday."
    assert mail.parse_output("Folder: Bills.") == "bills"
    assert mail.score(["bills", "work"], ["bills", "family"])["accuracy"] == 0.5
    with pytest.raises(ValueError, match=r"'spam' is not a mail-folder label; labels: work, family, bills"):
        mail.validate_item(HistoryItem("m2", {"subject": "a", "body": "b", "folder": "spam"}), "test")

    # generation: ROUGE, answer prefixes and quotes stripped, the target rendered first in context
    note_item = HistoryItem("n1", {"text": "Buy strings and a capo before the gig.", "title": "Gig shopping"})
    assert note.metric_names == ("rouge-1", "rouge-L") and note.labels is None
    assert note.parse_output('Title: "Gig shopping"\nmore') == "Gig shopping"
    assert note.score(["Gig shopping"], ["Gig shopping"])["rouge-L"] == 1.0
    assert note.render_item(note_item) == 'title "Gig shopping": Buy strings and a capo before the gig.'
    assert note.item_text(note_item) == "Buy strings and a capo before the gig. Gig shopping"
    assert note.description == "my notes -> my titles"

    # the same file again is a no-op; the built-in tasks are unchanged
    assert load_task_file(_write(tmp_path, CONFIG, "again.toml"))[0] is mood
    assert set(BUILTIN_TASKS) <= set(TASKS)


BASE = {"name": '"t1"', "kind": '"generation"', "fields": '["text", "title"]', "target": '"title"',
        "instruction": '"Title for: {text}"'}


def _task_toml(**over):
    keys = {**BASE, **over}
    return "[[tasks]]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items() if v is not None)


@pytest.mark.parametrize("over, message", [
    ({"kind": '"regression"'},
     "task 't1': kind='regression' is not allowed; choose one of classification, rating, generation"),
    ({"name": None}, "a [[tasks]] table has name=''; give each task a name of letters, digits, - _ . (at most 64 characters)"),
    ({"target": '"summary"'}, "task 't1': target='summary' is not one of its fields; choose one of text, title"),
    ({"instruction": '"Title for: {body}"'},
     "task 't1': instruction uses 'body', which is not one of its fields; fields: text, title"),
    ({"instruction": '"Title for: {title}"'},
     "task 't1': instruction uses {title}, the target: the answer would be in the question; use only text"),
    ({"instruction": '"Write a title"'},
     "task 't1': instruction 'Write a title' uses no field; write the question with {field} placeholders, "
     "e.g. 'Answer for: {text}'"),
    ({"instruction": '"Title for: {text!r}"'},
     "task 't1': instruction 'Title for: {text!r}': {text!r} must be a plain {field} name"),
    ({"fields": '["text", "id"]', "target": '"text"', "instruction": '"x {id}"'},
     "task 't1': field name 'id' is not allowed; use letters, digits, _ . - (starting with a letter or _), "
     "not one of id, time, date, fields"),
    ({"labels": '["a", "b"]'}, "task 't1': labels are for kind = \"classification\"; a generation task has none"),
    ({"kind": '"classification"', "labels": '["only"]'},
     "task 't1': a classification task needs labels, 2 or more distinct non-empty answers, e.g. labels = "
     "[\"work\", \"personal\"]; got ['only']"),
    ({"kind": '"rating"', "scale": "[5, 1]"},
     "task 't1': scale=[5, 1] must be [lowest, highest], whole numbers 0 <= lowest < highest, e.g. scale = [1, 5]"),
    ({"kind": '"rating"', "metric": '"rouge-L"'},
     "task 't1': metric='rouge-L' is not allowed for a rating task; choose one of mae, rmse"),
    ({"colour": '"red"'}, "unknown setting tasks[0].colour; known settings here: description, fields, index_fields, "
     "instruction, kind, labels, max_new_tokens, metric, name, render, scale, target"),
    ({"name": '"amazon-title"'}, "task 'amazon-title' is a built-in task; give yours another name (built-in: "
     + ", ".join(BUILTIN_TASKS) + ")"),
])
def test_a_bad_task_config_is_refused_naming_file_task_field_and_choices(tmp_path, over, message):
    path = _write(tmp_path, _task_toml(**over))
    with pytest.raises(ValueError) as err:
        load_task_file(path)
    assert str(err.value) == f"{path}: {message}"
    assert "t1" not in TASKS  # nothing registered


def test_a_file_registers_all_its_tasks_or_none(tmp_path):
    path = _write(tmp_path, _task_toml() + _task_toml(name='"LaMP-4"'))
    with pytest.raises(ValueError, match=r"task 'LaMP-4' is a built-in task; give yours another name"):
        load_task_file(path)
    assert "t1" not in TASKS and get_task("LaMP-4").description == "personalized news headline generation"


def test_a_name_defined_twice_is_refused(tmp_path):
    path = _write(tmp_path, _task_toml() + _task_toml(instruction='"Other: {text}"'))
    with pytest.raises(ValueError) as err:
        load_task_file(path)
    assert str(err.value) == f"{path}: task 't1' is defined twice in {path}; one [[tasks]] table per name"


def test_oppu_tasks_prints_fields_answers_metrics_and_an_addable_line(tmp_path, capsys):
    from client.items import parse_items
    from oppu.cli import main

    path = _write(tmp_path, CONFIG)
    assert main(["tasks", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    blocks = {b.split()[0]: b for b in out.strip().split("\n\n")}
    assert set(blocks) == set(BUILTIN_TASKS) | {"mood-rating", "mail-folder", "note-title"}
    assert blocks["mood-rating"].splitlines()[:4] == [
        "mood-rating  (rating; metrics: rmse, mae)",
        "  defined in config (rating)",
        "  item fields:  entry, mood",
        "  question from: entry   answer: mood (a whole rating 0-10)",
    ]
    assert "answer: folder (one of: work, family, bills)" in blocks["mail-folder"]
    assert "question from: body   answer: subject (free text)" in blocks["commit-title"]
    assert "item fields:  text, score" in blocks["amazon-rating"]
    for name, block in blocks.items():  # every example line is an item the daemon stores as it is
        line = block.splitlines()[-1]
        assert line.startswith("  example line: {")
        item = json.loads(line.split(": ", 1)[1])
        assert [it.fields for it in parse_items([item], get_task(name), max_field_chars=20000)] == [item["fields"]]


def test_oppu_tasks_and_import_read_the_daemons_own_config(tmp_path, capsys, monkeypatch):
    from oppu.cli import main

    data = tmp_path / "client"
    data.mkdir()
    _write(tmp_path, CONFIG, "client/daemon.toml")
    monkeypatch.setenv("OPPU_CLIENT_DIR", str(tmp_path / "elsewhere"))
    assert main(["tasks", "note-title"]) == 2
    assert "unknown task 'note-title'" in capsys.readouterr().err
    monkeypatch.setenv("OPPU_CLIENT_DIR", str(data))
    assert main(["tasks", "note-title"]) == 0
    assert capsys.readouterr().out.startswith("note-title  (generation; metrics: rouge-1, rouge-L)\n  my notes -> my titles\n")
    src = _write(tmp_path, '{"body": "Strings and a capo", "title": "Shopping"}\n', "notes.jsonl")
    out = tmp_path / "history.jsonl"
    assert main(["import", "jsonl", str(src), "--task", "note-title", "--map", "text=body", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["fields"] == {"text": "Strings and a capo", "title": "Shopping"}


def test_the_daemon_config_declares_a_task_and_serves_it(tmp_path):
    from client.items import ItemError, parse_items
    from client.settings import load_daemon

    path = _write(tmp_path, 'task = "note-title"\n' + CONFIG, "daemon.toml")
    spec = load_daemon(path)
    assert spec.task == "note-title" and [t.name for t in spec.tasks] == ["mood-rating", "mail-folder", "note-title"]
    task = get_task(spec.task)
    stored = parse_items([{"id": "n1", "fields": {"text": "Strings!", "title": "Gig"}}], task, max_field_chars=100)
    assert stored[0].fields == {"text": "Strings!", "title": "Gig"}
    with pytest.raises(ItemError, match=r"item 'n2' has no field 'title'; note-title items need: text, title"):
        parse_items([{"id": "n2", "fields": {"text": "x"}}], task, max_field_chars=100)
    bad = _write(tmp_path, 'task = "note-title"\n' + _task_toml(name='"note-title"', kind='"story"'), "bad.toml")
    with pytest.raises(ValueError) as err:
        load_daemon(bad)
    assert str(err.value) == (f"{bad}: task 'note-title': kind='story' is not allowed; choose one of "
                              "classification, rating, generation")
