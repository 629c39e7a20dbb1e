"""Plain typed records that flow between the data readers, the stores, training and evaluation.

A user is a chronologically ordered history plus the queries we evaluate them on. Items keep
their task-specific fields as strings (LaMP profiles are flat string-valued JSON objects), so one
record type serves every task; the task object knows which fields it needs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class HistoryItem:
    """One entry of a user's history (a LaMP profile item).

    `fields` holds the task's fields, e.g. {"text": ..., "score": "4"} for a rating task.
    `time` orders the history; items with equal time keep their given order.
    """

    id: str
    fields: Mapping[str, str]
    time: int = 0

    def get(self, name: str) -> str:
        return self.fields[name]

    def to_lamp(self) -> dict[str, str]:
        """The LaMP profile-item JSON object for this item."""
        out = {"id": self.id, **{k: str(v) for k, v in self.fields.items()}}
        if self.time:
            out["date"] = str(self.time)
        return out


def field_text(value: object, where: str) -> str | None:
    """A field value as item text, the one rule for every reader of a person's items (the daemon's
    API and archives, the importers): strings as they are, numbers as written (5 and 5.0 -> '5',
    4.5 -> '4.5'), None (JSON null) as missing. true/false, lists, objects and non-finite numbers
    are refused naming `where`."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        shown = json.dumps(value)[:40] if isinstance(value, (bool, dict, list, float)) else repr(value)[:40]
        raise ValueError(f"{where}: {shown} must be text or a number")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Query:
    """A question asked of the model for one user. `input` is the full LaMP input string."""

    id: str
    input: str
    target: str | None = None


@dataclass
class UserData:
    """One user: history (oldest first) and the queries held out for evaluation."""

    user_id: str
    history: list[HistoryItem]
    queries: list[Query]
    profile_text: str | None = None  # a user-supplied profile for PAG, when given


@dataclass
class TaskDataset:
    """Users of one task, split so that no evaluated user's data can reach the base adapter.

    `base_users` train the shared base adapter; `eval_users` are personalized and evaluated.
    `source` says where the data came from (a path, or "synthetic(seed=...)").
    """

    task: str
    base_users: list[UserData]
    eval_users: list[UserData]
    source: str
    notes: list[str] = field(default_factory=list)
    # user id -> activity level (low | medium | high: tertile of history size among the users the
    # evaluated ones were chosen from; shared/data/selection.py), when the source knows it.
    levels: dict[str, str] = field(default_factory=dict)
