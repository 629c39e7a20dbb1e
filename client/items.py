"""History items as they arrive from outside (API requests, import archives): shape and task checks.

One validation path for every entry point. Shape (types, lengths, no control characters in ids)
is a pydantic model, so the API's OpenAPI schema states it; meaning (the task's fields and no
others, a valid rating or label) comes from the task (`Task.validate_item`). Errors carry a
location such as ("items", 3, "fields", "score") so a client is told which field of which item
is wrong.

Forgiving where the meaning is plain, exact where it is not: a field given as a number is its
text as written (shared.records.field_text, the importers' rule: 5 and 5.0 -> '5'), and the
answer is stored in the task's own spelling (Task.canonical_fields: a rating '5.0' -> '5');
a field the task does not have is refused, naming the ones it has.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Sequence

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from shared.records import HistoryItem, field_text

MAX_ID_CHARS = 256
MAX_FIELDS = 32
MAX_FIELD_NAME_CHARS = 64
MAX_TIME = 2**53  # exact in JSON doubles; far beyond any timestamp
_ID = re.compile(r"^[^\x00-\x1f\x7f]+$")
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
# The same rule as `_id_printable`, stated in the schema: no control characters, no surrounding spaces.
FIELD_NAME_PATTERN = _FIELD_NAME.pattern
ID_PATTERN = r"^[^\x00-\x1f\x7f\s](?:[^\x00-\x1f\x7f]*[^\x00-\x1f\x7f\s])?$"



def check_text(value: str, what: str) -> str:
    """Text we can store, tokenize and send back: valid Unicode (no lone surrogates, which JSON
    allows as escapes) and no NUL characters."""
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode text (a lone surrogate escape)") from None
    return value


def _whole(v: Any) -> Any:
    """JSON has one number type: 5.0 is the integer 5 (as JSON Schema says), 5.5 is not."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


WholeNumber = BeforeValidator(_whole)


def _number_as_text(v: Any) -> Any:
    """A field given as a JSON number is the text it is written as (5.0 -> '5'); text passes, and
    anything else is refused by the strict string check after this, or here with the reason."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return field_text(v, "a field value")
    if v is None or isinstance(v, (bool, list, dict)):
        raise ValueError(f"a field value must be text or a number, not {type(v).__name__ if v is not None else 'null'}")
    return v


FieldText = Annotated[str, BeforeValidator(_number_as_text)]

ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN,
                              description="Unique id (printable, no surrounding spaces); re-adding it is a no-op.")]


class ItemIn(BaseModel):
    """One history item: the task's fields as strings, and a time that orders the history."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: ItemId
    fields: dict[str, FieldText] = Field(
        description="The task's fields and no others, e.g. {'text': ..., 'score': 4} for amazon-rating (see GET "
        "/v1/status or `oppu tasks`); text, or a number for its text (a rating 5 or 5.0 is stored as '5').",
    )
    time: Annotated[int, WholeNumber] = Field(default=0, ge=0, le=MAX_TIME,
                      description="Orders the history (e.g. unix seconds); equal times keep insertion order.")

    @field_validator("id")
    @classmethod
    def _id_printable(cls, v: str) -> str:
        if not _ID.match(v) or v != v.strip():
            raise ValueError("id must be printable text without control characters or surrounding spaces")
        return check_text(v, "id")

    @field_validator("fields")
    @classmethod
    def _field_names(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_FIELDS:
            raise ValueError(f"an item has at most {MAX_FIELDS} fields")
        for name in v:
            if len(name) > MAX_FIELD_NAME_CHARS or not _FIELD_NAME.match(name):
                raise ValueError(f"field name {name[:MAX_FIELD_NAME_CHARS]!r} must be a short identifier "
                                 "(letters, digits, _ . -)")
        for name, value in v.items():
            check_text(value, f"field {name!r}")
        return v


class ItemError(ValueError):
    """A history item that cannot be stored; `loc` points at the offending part."""

    def __init__(self, loc: Sequence[Any], msg: str) -> None:
        super().__init__(msg)
        self.loc = tuple(loc)
        self.msg = msg

    def detail(self, prefix: Sequence[Any] = ()) -> dict[str, Any]:
        return {"loc": [*prefix, *self.loc], "msg": self.msg, "type": "value_error"}


def check_item(item: ItemIn, task: Any, *, index: int, max_field_chars: int) -> HistoryItem:
    """The task-level checks for one shaped item; returns the record to store (the answer in the
    task's spelling: Task.canonical_fields)."""
    where = ("items", index)
    unknown = [name for name in item.fields if name not in task.item_fields]
    if unknown:
        raise ItemError((*where, "fields", unknown[0]), f"item {item.id!r} has field {unknown[0]!r}, which {task.name} "
                        f"items do not have; allowed fields: {', '.join(task.item_fields)} (a task with other fields is a "
                        "[[tasks]] table in daemon.toml)")
    for name, value in item.fields.items():
        if len(value) > max_field_chars:
            raise ItemError((*where, "fields", name), f"field {name!r} is {len(value)} characters; the limit is "
                            f"{max_field_chars} (daemon.max_field_chars)")
    for name in task.item_fields:
        value = item.fields.get(name)
        if value is None:
            raise ItemError((*where, "fields", name), f"item {item.id!r} has no field {name!r}; {task.name} items "
                            f"need: {', '.join(task.item_fields)}")
        if not value.strip():
            raise ItemError((*where, "fields", name), f"item {item.id!r} field {name!r} is empty")
    record = HistoryItem(id=item.id, fields=task.canonical_fields(item.fields), time=item.time)
    try:
        task.validate_item(record, f"items[{index}]")
    except ValueError as e:
        field = task.label_field or "fields"
        raise ItemError((*where, "fields", field), str(e)) from None
    return record


def parse_items(raw: Sequence[Any], task: Any, *, max_field_chars: int) -> list[HistoryItem]:
    """Validate plain JSON objects (e.g. an archive's history.jsonl) exactly as the API does."""
    out = []
    for i, obj in enumerate(raw):
        try:
            shaped = ItemIn.model_validate(obj)
        except ValidationError as e:
            err = e.errors()[0]
            raise ItemError(("items", i, *err["loc"]), err["msg"]) from None
        out.append(check_item(shaped, task, index=i, max_field_chars=max_field_chars))
    return out


def item_out(item: HistoryItem) -> dict[str, Any]:
    return {"id": item.id, "fields": dict(item.fields), "time": item.time}
