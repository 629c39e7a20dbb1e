"""A person's own data as history items of a task: JSONL and CSV files with a field mapping, and
the commit history of a git repository (one author's commit bodies -> their commit titles).

Each importer returns an ImportResult whose items are validated by the task exactly as the daemon
validates them (`Task.validate_item`), oldest first; `write_history` writes them as the daemon's
item lines ({"id", "fields", "time"} per line, what `oppu client add` and archives read),
atomically. Nothing is guessed: a missing or empty field, a column the task does not know, a
value that is not text or a number, or an id used twice for different content is an error
naming the file, the line and the field.

A mapping says which source column fills which task field (`text=body`: the task's `text` from
the column `body`); unmapped task fields, `id` and `time` (or `date`) are read from columns of
their own name. A record without an id gets one from its content, so importing the same data
again adds nothing new.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..fileio import atomic_write
from ..jsonl import json_lines
from ..records import HistoryItem, field_text
from ..tasks import Task
from .lamp import parse_date

_ID_COLUMN, _TIME_COLUMNS = "id", ("time", "date")
_MAX_ID_CHARS = 256  # the daemon's limit (client/items.py)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class ImportResult:
    """The items (oldest first) and what was left out, by reason."""

    items: list[HistoryItem]
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        left = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()) if n)
        return f"{len(self.items)} items" + (f" (left out: {left})" if left else "")


def parse_mapping(pairs: Sequence[str], task: Task) -> dict[str, str]:
    """`--map FIELD=COLUMN` strings -> {task field: source column}; FIELD is a task field, id or time."""
    allowed = (*task.item_fields, _ID_COLUMN, "time")
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        name, column = name.strip(), column.strip()
        if not sep or not name or not column:
            raise ValueError(f"--map {pair!r} must look like FIELD=COLUMN, e.g. --map {task.item_fields[0]}=body")
        if name not in allowed:
            raise ValueError(f"--map {pair!r}: {name!r} is not a field of task {task.name}; fields: "
                             f"{', '.join(allowed)}")
        if name in out:
            raise ValueError(f"--map {pair!r}: {name!r} is mapped twice")
        out[name] = column
    return out


class _Records:
    """Turns source records (column -> value) into checked items for one task and mapping."""

    def __init__(self, task: Task, mapping: Mapping[str, str], ignore: Sequence[str] = ()) -> None:
        self.task = task
        self.columns = {f: mapping.get(f, f) for f in task.item_fields}
        self.id_column = mapping.get(_ID_COLUMN, _ID_COLUMN)
        self.time_columns = (mapping["time"],) if "time" in mapping else _TIME_COLUMNS
        self.known = {*self.columns.values(), self.id_column, *self.time_columns, *ignore}
        self.ignore = tuple(ignore)
        self.seen: dict[str, tuple[HistoryItem, str]] = {}

    def source_columns(self) -> set[str]:
        return {*self.columns.values(), self.id_column, *self.time_columns}

    def item(self, record: Mapping[str, Any], where: str) -> HistoryItem | None:
        """The item of one record; None when it repeats an earlier one exactly."""
        unknown = [c for c in record if c not in self.known]
        if unknown:
            mappable = ", ".join(self.task.item_fields)
            raise ValueError(f"{where}: column {unknown[0]!r} is not a field of task {self.task.name} ({mappable}); "
                             f"map it with --map FIELD={unknown[0]}, or leave it out with --ignore {unknown[0]}")
        fields = {}
        for name, column in self.columns.items():
            text = field_text(record.get(column), f"{where}: column {column!r}")
            source = f" (from column {column!r})" if column != name else ""
            if text is None or not text.strip():
                have = ", ".join(str(c) for c in record) or "none"
                raise ValueError(f"{where}: field {name!r}{source} is missing or empty; {self.task.name} items need "
                                 f"{', '.join(self.task.item_fields)}; this record's columns: {have}")
            fields[name] = text
        item_id = field_text(record.get(self.id_column), f"{where}: column {self.id_column!r}")
        if item_id is None or not item_id.strip():
            item_id = content_id(fields)
        elif len(item_id) > _MAX_ID_CHARS or _CONTROL.search(item_id) or item_id != item_id.strip():
            raise ValueError(f"{where}: id {item_id[:40]!r} must be printable text of at most {_MAX_ID_CHARS} "
                             "characters without surrounding spaces")
        when = next((record[c] for c in self.time_columns if record.get(c) not in (None, "")), None)
        # The answer in the task's own spelling ('5.0' -> '5'), as the daemon stores it.
        item = HistoryItem(item_id, self.task.canonical_fields(fields), 0 if when is None else parse_date(when, where))
        self.task.validate_item(item, where)
        earlier = self.seen.get(item_id)
        if earlier is not None:
            if earlier[0] == item:
                return None
            raise ValueError(f"{where}: id {item_id!r} was already used by {earlier[1]} for different content; "
                             "ids must be unique")
        self.seen[item_id] = (item, where)
        return item


def content_id(fields: Mapping[str, str]) -> str:
    """A stable id from an item's fields: the same content gets the same id on every import."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # a directory, no permission, ...
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None


def _collect(records: _Records, rows: Iterable[tuple[Mapping[str, Any], str]]) -> ImportResult:
    result = ImportResult([])
    for record, where in rows:
        item = records.item(record, where)
        if item is None:
            result.skipped["repeated"] += 1
        else:
            result.items.append(item)
    result.items.sort(key=lambda it: it.time)  # stable: equal times keep the file's order
    return result


def import_jsonl(path: str | Path, task: Task, mapping: Mapping[str, str] = {}, ignore: Sequence[str] = ()) -> ImportResult:
    """One flat JSON object per line (blank lines skipped)."""
    records = _Records(task, mapping, ignore)

    def rows() -> Iterable[tuple[Mapping[str, Any], str]]:
        for n, obj in json_lines(_read_text(path).splitlines(), path):
            where = f"{path}: line {n}"
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: not a JSON object")
            if isinstance(obj.get("fields"), dict):
                raise ValueError(f"{where}: already an item ({{\"id\", \"fields\", ...}}); add such a file with "
                                 "`oppu client add` as it is")
            yield obj, where

    return _collect(records, rows())


def import_csv(path: str | Path, task: Task, mapping: Mapping[str, str] = {}, ignore: Sequence[str] = ()) -> ImportResult:
    """A CSV file whose first line names the columns (quoted values may span lines)."""
    records = _Records(task, mapping, ignore)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{path}: empty; the first line must name the columns") from None
    except csv.Error as e:
        raise ValueError(f"{path}: line 1: not valid CSV ({e})") from None
    header = [h.strip() for h in header]
    dup = [h for h, n in Counter(header).items() if n > 1]
    if dup or "" in header:
        raise ValueError(f"{path}: line 1 (header): column names must be distinct and non-empty; got {header}")
    for name, column in records.columns.items():
        if column not in header:
            via = f" (--map {name}={column})" if column != name else ""
            raise ValueError(f"{path}: line 1 (header): no column {column!r} for field {name!r}{via}; columns: "
                             f"{', '.join(header)}")
    for name in (_ID_COLUMN, "time"):
        if name in mapping and mapping[name] not in header:
            raise ValueError(f"{path}: line 1 (header): no column {mapping[name]!r} for {name!r} "
                             f"(--map {name}={mapping[name]}); columns: {', '.join(header)}")

    def rows() -> Iterable[tuple[Mapping[str, Any], str]]:
        line = reader.line_num + 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise ValueError(f"{path}: line {line}: not valid CSV ({e})") from None
            where = f"{path}: line {line}"
            line = reader.line_num + 1
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise ValueError(f"{where}: {len(values)} values but the header names {len(header)} columns")
            yield dict(zip(header, values)), where

    return _collect(records, rows())


# -- git --------------------------------------------------------------------------------------

# One commit per NUL-terminated record (-z), its parts split by the unit separator; the raw
# message (%B), the only free text, comes last so nothing in it can shift the other parts.
_GIT_FORMAT = "%H%x1f%P%x1f%at%x1f%an%x1f%ae%x1f%B"
_TRAILER = re.compile(r"^[A-Za-z][A-Za-z0-9-]*: \S")


def split_message(message: str) -> tuple[str, str]:
    """(subject, body) of a commit message as git reads it: the subject is the first paragraph
    joined into one line; the body is the rest, without a closing block of trailers
    (Signed-off-by: ..., Co-authored-by: ...)."""
    paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", message.strip()) if p.strip()]
    if not paragraphs:
        return "", ""
    subject = " ".join(line.strip() for line in paragraphs[0].splitlines())
    rest = paragraphs[1:]
    if rest and all(_TRAILER.match(line) for line in rest[-1].splitlines()):
        rest = rest[:-1]
    return subject, "\n\n".join(rest)


def import_git(repo: str | Path, author: str, task: Task, mapping: Mapping[str, str] = {}, *,
               rev: str = "HEAD", max_count: int = 0) -> ImportResult:
    """The commits reachable from `rev` whose author name or email equals `author` (any case),
    as items {body -> subject} (commit-title; another task's fields come through `mapping`,
    e.g. message=body). Merge commits and commits without a body are left out and counted."""
    if not rev.strip() or rev.startswith("-"):  # an option in its place would change what git does
        raise ValueError(f"--rev {rev!r} must name a revision (a branch, tag or commit), not an option")
    cmd = ["git", "-C", str(repo), "-c", "log.showSignature=false", "-c", "i18n.logOutputEncoding=UTF-8",
           "log", "-z", "--no-color", f"--format={_GIT_FORMAT}", rev, "--"]
    env = {**os.environ, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"}
    try:
        done = subprocess.run(cmd, capture_output=True, env=env, check=False)
    except FileNotFoundError:
        raise RuntimeError(f"git is not installed; it is needed to read {repo}") from None
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ValueError(f"{repo}: git log {rev} failed: {said[-1] if said else 'exit ' + str(done.returncode)}")
    records = _Records(task, mapping)
    wanted = author.strip().lower()
    result = ImportResult([])
    authors: Counter = Counter()
    matched = 0
    rows = []
    for raw in done.stdout.decode("utf-8", "replace").split("\x00"):
        if not raw.strip():
            continue
        commit, parents, when, name, email, message = raw.split("\x1f", 5)
        authors[f"{name} <{email}>"] += 1
        if wanted not in (name.strip().lower(), email.strip().lower()):
            result.skipped["by other authors"] += 1
            continue
        matched += 1
        if len(parents.split()) > 1:
            result.skipped["merges"] += 1
            continue
        subject, body = split_message(message)
        if not body or not subject:
            result.skipped["without a body"] += 1
            continue
        rows.append(({"id": commit, "time": when, "subject": subject, "body": body}, f"{repo}: commit {commit[:12]}"))
    if not authors:
        raise ValueError(f"{repo}: {rev} has no commits")
    if not matched:
        top = ", ".join(f"{a} ({n})" for a, n in authors.most_common(10))
        raise ValueError(f"{repo}: no commit by {author!r} (author name or email, any case); authors: {top}")
    rows.reverse()  # git lists newest first; a history is oldest first
    found = _collect(records, rows)
    found.skipped.update(result.skipped)
    if max_count and len(found.items) > max_count:
        found.skipped["older than the newest max-count"] += len(found.items) - max_count
        found.items = found.items[-max_count:]
    return found


def write_history(path: str | Path, items: Sequence[HistoryItem]) -> Path:
    """The items as the daemon's item lines, written atomically and durably."""
    if not items:
        raise ValueError(f"{path}: nothing to write (no items)")
    lines = (json.dumps({"id": it.id, "fields": dict(it.fields), "time": it.time}, ensure_ascii=False) for it in items)
    return atomic_write(path, "".join(line + "\n" for line in lines))
