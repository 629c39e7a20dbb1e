"""JSON Lines: one JSON value per line, blank lines skipped. The one reader of the rule for every
JSONL input (Amazon reviews, `oppu import` JSONL, `oppu client add` files, an export's history),
so a bad line is reported the same way everywhere: the file, the line and the column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator


def json_lines(lines: Iterable[str], source: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number from 1, value) for each line of `lines` that is not blank. A line that is not
    JSON raises ValueError: "<source>: line <n>: not valid JSON (<what>, column <c>)"."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.rstrip("\r\n"))  # so a column counts within the line
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
        yield n, value
