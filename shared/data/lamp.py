"""Read and write LaMP-format files.

LaMP ships each split as two files in one directory:
  {split}_questions.json  [{"id", "input", "profile": [{"id", <task fields>..., "date"?}]}, ...]
  {split}_outputs.json    {"task": ..., "golds": [{"id", "output"}, ...]}
Each question is one user (the profile is that user's history). The outputs file is optional
(LaMP's test split hides it); without it queries have no target.

Files this module writes carry one extra key per question, "user_id", so a user with several
queries reads back as one user; LaMP's own tools ignore unknown keys. Every write is atomic.

The "task" of an outputs file (golds or predictions) is written as LaMP spells it ("LaMP_5",
see LAMP_TASK_NAMES): LaMP's evaluator (eval/evaluation.py) refuses predictions whose "task"
differs from the task it is asked to score or from the golds' "task". Reading accepts our
spelling and older ones too.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..fileio import atomic_write
from ..records import HistoryItem, Query, TaskDataset, UserData
from ..tasks import Task, get_task


# Our task names (configs, reports) -> the names LaMP's files and evaluator use. LaMP-2 is movie
# tagging in LaMP's current release, "LaMP_2". News categorization, the LaMP-2 of LaMP's first
# release (withdrawn since), keeps the name OPPU's evaluator gives it, "LaMP_2N": a file saying
# "LaMP_2" would be scored against the movie tags by LaMP's current evaluator.
LAMP_TASK_NAMES: dict[str, str] = {
    "LaMP-1": "LaMP_1", "LaMP-2M": "LaMP_2", "LaMP-2N": "LaMP_2N", "LaMP-3": "LaMP_3",
    "LaMP-4": "LaMP_4", "LaMP-5": "LaMP_5", "LaMP-7": "LaMP_7",
}
# Further names a file may carry for one of our tasks: OPPU's evaluator's name for movie tagging,
# and the first LaMP release's name for news categorization.
_ALSO_READ: dict[str, tuple[str, ...]] = {"LaMP-2M": ("LaMP_2M",), "LaMP-2N": ("LaMP_2",)}


def lamp_task_name(task: Task | str) -> str:
    """The "task" LaMP-format files carry for `task` (ours or LaMP's name; others unchanged)."""
    name = task.name if isinstance(task, Task) else str(task)
    return LAMP_TASK_NAMES.get(name, name)


def task_names_read(task: Task | str) -> tuple[str, ...]:
    """Every "task" an outputs file for `task` may carry: LaMP's spelling, ours, older ones."""
    name = task.name if isinstance(task, Task) else str(task)
    return tuple(dict.fromkeys((lamp_task_name(name), name, *_ALSO_READ.get(name, ()))))


def questions_path(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"{split}_questions.json"


def outputs_path(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"{split}_outputs.json"


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None


def _text(record: Mapping[str, Any], key: str, where: str) -> str:
    """A required scalar field as a string (LaMP ids are sometimes numbers)."""
    if key not in record:
        raise ValueError(f"{where}: missing field {key!r} (has: {', '.join(map(str, record)) or 'nothing'})")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: field {key!r} must be text, got {type(value).__name__}")
    return str(value)


def parse_date(value: Any, where: str) -> int:
    """A profile item's "date" as a sortable integer: an integer as is, an ISO date as Unix time."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    if len(text) > 64:
        raise ValueError(f"{where}: field 'date' is {len(text)} characters; a date or integer time is expected")
    if text.lstrip("-").isdecimal() and text.lstrip("-").isascii():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{where}: field 'date' {value!r} is neither an integer nor an ISO date") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        return int(moment.timestamp())
    except (OverflowError, OSError, ValueError):  # e.g. year 1 with a positive UTC offset
        raise ValueError(f"{where}: field 'date' {value!r} is out of range") from None


def _read_profile(profile: Any, qid: str, task: Task, where: str) -> list[HistoryItem]:
    if not isinstance(profile, list):
        raise ValueError(f"{where}: field 'profile' must be a list of items, got {type(profile).__name__}")
    has_dates = any(isinstance(p, dict) and "date" in p for p in profile)
    items = []
    for j, raw in enumerate(profile):
        at = f"{where}: profile[{j}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{at}: must be an object, got {type(raw).__name__}")
        fields: dict[str, str] = {}
        for key, value in raw.items():
            if key in ("id", "date") or value is None:
                continue
            if isinstance(value, (dict, list)):
                raise ValueError(f"{at}: field {key!r} must be text, got {type(value).__name__}")
            fields[key] = str(value)
        item_id = _text(raw, "id", at) if "id" in raw else f"{qid}-p{j}"
        # Without dates the profile's own order is its time order. With dates, an item without one
        # is time 0: that is how HistoryItem.to_lamp writes time 0, so our files round-trip.
        time = parse_date(raw["date"], at) if "date" in raw else (0 if has_dates else j)
        item = HistoryItem(id=item_id, fields=fields, time=time)
        task.validate_item(item, at)
        items.append(item)
    # Oldest first; sorted() is stable, so equal times keep the file's order.
    return sorted(items, key=lambda it: it.time)


def _read_golds(path: Path, task: Task) -> dict[str, str]:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise ValueError(f"{path}: expected an object {{\"task\": ..., \"golds\": [{{\"id\", \"output\"}}, ...]}}")
    names = task_names_read(task)
    if "task" in data and not (isinstance(data["task"], str) and data["task"] in names):
        raise ValueError(f"{path}: field 'task' is {str(data['task'])[:80]!r}, but these are read as {task.name} "
                         f"golds (task {' or '.join(map(repr, names))})")
    golds: dict[str, str] = {}
    for i, rec in enumerate(data["golds"]):
        where = f"{path}: golds[{i}]"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: must be an object with 'id' and 'output'")
        gid = _text(rec, "id", where)
        if gid in golds:
            raise ValueError(f"{where}: duplicate id {gid!r}")
        golds[gid] = _text(rec, "output", f"{where} (id {gid!r})")
    return golds


def read_lamp(directory: str | Path, split: str, task: Task | str) -> list[UserData]:
    """Users of one split, in file order. Each question is one user (LaMP); questions sharing a
    "user_id" (files written by write_lamp) are one user with several queries."""
    task = get_task(task)
    qpath, opath = questions_path(directory, split), outputs_path(directory, split)
    if not qpath.is_file():
        raise FileNotFoundError(f"{qpath}: no LaMP questions file for split {split!r} in {Path(directory)}")
    questions = _load_json(qpath)
    if not isinstance(questions, list):
        raise ValueError(f"{qpath}: expected a JSON list of questions, got {type(questions).__name__}")
    golds = _read_golds(opath, task) if opath.is_file() else None

    users: dict[str, UserData] = {}
    for i, rec in enumerate(questions):
        where = f"{qpath}: record {i}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: must be an object with id, input, profile")
        qid = _text(rec, "id", where)
        where = f"{qpath}: record {i} (id {qid!r})"
        query_input = _text(rec, "input", where)
        if "profile" not in rec:
            raise ValueError(f"{where}: missing field 'profile'")
        history = _read_profile(rec["profile"], qid, task, where)
        target = None
        if golds is not None:
            if qid not in golds:
                raise ValueError(f"{opath}: no gold output for question id {qid!r} (record {i} of {qpath})")
            target = golds[qid]
            task.validate_target(target, f"{opath}: gold for id {qid!r} field 'output'")
        uid = _text(rec, "user_id", where) if "user_id" in rec else qid
        profile_text = rec.get("profile_text") or None
        user = users.get(uid)
        if user is None:
            users[uid] = UserData(uid, history, [Query(qid, query_input, target)], profile_text)
            continue
        if [h.id for h in user.history] != [h.id for h in history]:
            raise ValueError(f"{where}: user_id {uid!r} appears with a different profile than before")
        user.queries.append(Query(qid, query_input, target))
    return list(users.values())


def load_lamp_dataset(directory: str | Path, task: Task | str) -> TaskDataset:
    """A LaMP directory as a TaskDataset: train split -> base_users, dev split -> eval_users.

    LaMP's train and dev users are different people, which is the split the base adapter needs.
    """
    task = get_task(task)
    directory = Path(directory)
    notes = []
    if questions_path(directory, "train").is_file():
        base = read_lamp(directory, "train", task)
    else:
        base = []
        notes.append(f"{questions_path(directory, 'train')} not found: no base-adapter users")
    return TaskDataset(task.name, base, read_lamp(directory, "dev", task), str(directory), notes)


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=1) + "\n"


def write_predictions(path: str | Path, task_name: str, preds: Mapping[str, str]) -> Path:
    """Predictions {query id: output} in LaMP's outputs format, readable by LaMP's evaluator:
    `task_name` (ours or LaMP's) is written as LaMP's (lamp_task_name)."""
    path = Path(path)
    golds = []
    for qid, out in preds.items():
        if not isinstance(out, str):
            raise ValueError(f"{path}: prediction for id {qid!r} must be a string, got {type(out).__name__}")
        golds.append({"id": str(qid), "output": out})
    return atomic_write(path, _dump({"task": lamp_task_name(task_name), "golds": golds}))


def write_lamp(directory: str | Path, split: str, users: Iterable[UserData], task: Task | str) -> tuple[Path, Path | None]:
    """Write users as {split}_questions.json (+ {split}_outputs.json when queries have targets).

    One question per query, each carrying the user's whole history as its profile. Items and
    targets are validated first so an export never contains what read_lamp would reject.
    """
    task = get_task(task)
    qpath, opath = questions_path(directory, split), outputs_path(directory, split)
    questions, golds, missing = [], [], []
    for user in users:
        where = f"{qpath}: user {user.user_id!r}"
        if not user.queries:
            raise ValueError(f"{where}: has no queries; a LaMP file can only hold a user through a question")
        for item in user.history:
            task.validate_item(item, f"{where} history")
        profile = [item.to_lamp() for item in user.history]
        for q in user.queries:
            rec: dict[str, Any] = {"id": q.id, "input": q.input, "profile": profile, "user_id": user.user_id}
            if user.profile_text:
                rec["profile_text"] = user.profile_text
            questions.append(rec)
            if q.target is None:
                missing.append(q.id)
            else:
                task.validate_target(q.target, f"{where} query {q.id!r} field 'target'")
                golds.append({"id": q.id, "output": q.target})
    if golds and missing:
        raise ValueError(f"{qpath}: queries {missing[:3]} have no target while others do; all or none must")
    atomic_write(qpath, _dump(questions))
    if not golds:
        return qpath, None
    atomic_write(opath, _dump({"task": lamp_task_name(task), "golds": golds}))
    return qpath, opath
