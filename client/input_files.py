"""History items read from a file (or stdin) for `oppu client add`: JSON, JSONL or flat LaMP objects.

Shapes only, before anything is sent: the daemon checks the task's fields (client/items.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from shared.data.lamp import parse_date
from shared.jsonl import json_lines
from shared.records import field_text


def read_items(path: str) -> list[dict[str, Any]]:
    """Items from JSON (a list, or {"items": [...]}) or JSONL; flat LaMP objects are accepted too.

    Shapes only (the daemon checks the task's fields): a ValueError names the file, the item (and
    line, for JSONL) and the field. Nothing is guessed: an item without an id, a field that is
    not text, or a date that is neither an integer nor an ISO date is refused."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    lines: list[int | None]
    try:
        if stripped.startswith("["):
            raw = json.loads(text)
            lines = [None] * len(raw)
        elif stripped.startswith("{") and "\n" not in stripped.strip():
            obj = json.loads(text)
            raw = obj.get("items", [obj]) if isinstance(obj, dict) else obj
            if not isinstance(raw, list):
                raise ValueError(f"{path}: 'items' must be a list of item objects")
            lines = [None] * len(raw)
        else:
            numbered = list(json_lines(text.splitlines(), path))
            lines, raw = [n for n, _ in numbered], [value for _, value in numbered]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    out = []
    for i, (obj, line) in enumerate(zip(raw, lines)):
        where = f"{path}: item {i}" + (f" (line {line})" if line else "")
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: not a JSON object")
        if "fields" in obj:
            out.append(obj)  # the daemon's own shape; it validates every key
            continue
        flat = dict(obj)  # a LaMP profile item: {"id", <fields>..., "date"?}
        item_id = flat.pop("id", None)
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
            raise ValueError(f"{where}: field 'id' is missing or not text (every item needs a unique id)")
        when = flat.pop("time", None) if "time" in flat else flat.pop("date", None)
        fields = {}
        for k, v in flat.items():
            text = field_text(v, f"{where}: field {k!r}")  # numbers as written, as the daemon reads them
            if text is not None:
                fields[k] = text
        out.append({"id": str(item_id), "fields": fields, "time": 0 if when is None else parse_date(when, where)})
    return out
