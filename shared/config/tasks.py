"""Tasks a person defines in a config file: `[[tasks]]` tables, parsed once into TaskSpec and
built into the same shared.tasks.Task the built-in tasks are, registered under their name.

    [[tasks]]
    name = "note-title"
    kind = "generation"                  # classification (with labels) | rating (with scale) | generation
    fields = ["text", "title"]           # every field an item has
    target = "title"                     # the field the model answers with
    instruction = "Write a title for this note: {text}"   # the question, over the other fields
    metric = "rouge-L"                   # optional: which of the kind's metrics selects and reports first

Read from the daemon's config (client/settings.py) or any TOML file holding such tables
(`load_task_file`, for `oppu tasks --config` and `oppu import --config`).
"""

from __future__ import annotations

import re
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tasks import Task, register_tasks
from .parsing import _coerce

TASK_KINDS = ("classification", "rating", "generation")
# Config kind -> the Task kind that scores it (a rating is scored as LaMP-3's regression).
_TASK_KIND = {"classification": "classification", "rating": "regression", "generation": "generation"}
KIND_METRICS = {"classification": ("accuracy", "f1"), "rating": ("mae", "rmse"), "generation": ("rouge-1", "rouge-L")}
_MAX_NEW_TOKENS = {"classification": 8, "rating": 4, "generation": 32}
# Item keys the importers and the daemon's item reader give their own meaning.
RESERVED_FIELDS = ("id", "time", "date", "fields")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")  # the daemon's rule for item field names


@dataclass(frozen=True)
class TaskSpec:
    """One task defined in a config. Only name, kind, fields, target and instruction are required."""

    name: str = field(default="", metadata={"help": "Unique task name (letters, digits, - _ .); not a built-in one."})
    kind: str = field(default="", metadata={"help": "classification | rating | generation."})
    fields: tuple[str, ...] = field(default=(), metadata={"help": "Every field of an item, the target included."})
    target: str = field(default="", metadata={"help": "The field the model answers with (what it learns to write)."})
    instruction: str = field(
        default="",
        metadata={"help": "The question, a template over the other fields, e.g. 'Write a title for: {text}'. "
                  "The fixed text before the first {field} is cut off to search the history with the rest."},
    )
    labels: tuple[str, ...] = field(default=(), metadata={"help": "classification: the allowed answers (2 or more)."})
    scale: tuple[int, ...] = field(default=(), metadata={"help": "rating: [lowest, highest] whole rating (default [1, 5])."})
    metric: str = field(default="", metadata={"help": "accuracy | f1, mae | rmse, rouge-1 | rouge-L (default: the first)."})
    render: str = field(
        default="", metadata={"help": "How a retrieved item reads in a prompt (template over fields); default "
                              "'<target> \"{target}\": {the instruction's fields}'."})
    index_fields: tuple[str, ...] = field(
        default=(), metadata={"help": "Fields the history search indexes (default: the instruction's fields, "
                              "plus the target for generation)."})
    max_new_tokens: int = field(default=0, metadata={"help": "Longest answer in tokens (default 8 / 4 / 32 by kind)."})
    description: str = field(default="", metadata={"help": "One line shown by `oppu tasks`."})

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"a [[tasks]] table has name={self.name!r}; give each task a name of letters, digits, "
                             "- _ . (at most 64 characters)")
        where = f"task {self.name!r}"
        if self.kind not in TASK_KINDS:
            raise ValueError(f"{where}: kind={self.kind!r} is not allowed; choose one of {', '.join(TASK_KINDS)}")
        if not self.fields:
            raise ValueError(f"{where}: fields is empty; list every field of an item, e.g. fields = [\"text\", \"title\"]")
        for f in self.fields:
            if not _FIELD.match(f) or f in RESERVED_FIELDS:
                raise ValueError(f"{where}: field name {f!r} is not allowed; use letters, digits, _ . - (starting with a "
                                 f"letter or _), not one of {', '.join(RESERVED_FIELDS)}")
        if len(set(self.fields)) != len(self.fields):
            raise ValueError(f"{where}: fields lists a name twice: {', '.join(self.fields)}")
        if self.target not in self.fields:
            raise ValueError(f"{where}: target={self.target!r} is not one of its fields; choose one of "
                             f"{', '.join(self.fields)}")
        used = _placeholders(self.instruction, f"{where}: instruction")
        if not used:
            raise ValueError(f"{where}: instruction {self.instruction!r} uses no field; write the question with "
                             f"{{field}} placeholders, e.g. 'Answer for: {{{self._inputs()[0]}}}'")
        self._only_fields(used, "instruction")
        if self.target in used:
            raise ValueError(f"{where}: instruction uses {{{self.target}}}, the target: the answer would be in the "
                             f"question; use only {', '.join(self._inputs())}")
        self._only_fields(_placeholders(self.render, f"{where}: render"), "render")
        self._only_fields(self.index_fields, "index_fields")
        if self.kind == "classification":
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels) or not all(x.strip() for x in self.labels):
                raise ValueError(f"{where}: a classification task needs labels, 2 or more distinct non-empty answers, "
                                 f"e.g. labels = [\"work\", \"personal\"]; got {list(self.labels)}")
        elif self.labels:
            raise ValueError(f"{where}: labels are for kind = \"classification\"; a {self.kind} task has none")
        if self.kind == "rating":
            low, high = self.rating_scale
            if len(self.scale) not in (0, 2) or not low < high or low < 0:
                raise ValueError(f"{where}: scale={list(self.scale)} must be [lowest, highest], whole numbers "
                                 "0 <= lowest < highest, e.g. scale = [1, 5]")
        elif self.scale:
            raise ValueError(f"{where}: scale is for kind = \"rating\"; a {self.kind} task has none")
        if self.metric and self.metric not in KIND_METRICS[self.kind]:
            raise ValueError(f"{where}: metric={self.metric!r} is not allowed for a {self.kind} task; choose one of "
                             f"{', '.join(KIND_METRICS[self.kind])}")
        if self.max_new_tokens < 0:
            raise ValueError(f"{where}: max_new_tokens={self.max_new_tokens} must be >= 1 (0: the kind's default)")

    @property
    def rating_scale(self) -> tuple[int, int]:
        return (self.scale[0], self.scale[-1]) if self.scale else (1, 5)

    def _inputs(self) -> list[str]:
        return [f for f in self.fields if f != self.target]

    def _only_fields(self, names: Any, what: str) -> None:
        for n in names:
            if n not in self.fields:
                raise ValueError(f"task {self.name!r}: {what} uses {n!r}, which is not one of its fields; "
                                 f"fields: {', '.join(self.fields)}")

    def build(self) -> Task:
        """The Task object this spec defines."""
        inputs = tuple(dict.fromkeys(_placeholders(self.instruction, "")))
        prefix = _fixed_prefix(self.instruction)
        target = f'"{{{self.target}}}"' if self.kind == "generation" else f"{{{self.target}}}"
        render = self.render or f"{self.target} {target}: " + " ".join(f"{{{f}}}" for f in inputs)
        index = self.index_fields or (inputs + (self.target,) if self.kind == "generation" else inputs)
        labels = None
        if self.kind == "classification":
            labels = tuple(self.labels)
        elif self.kind == "rating":
            low, high = self.rating_scale
            labels = tuple(str(v) for v in range(low, high + 1))
        return Task(
            name=self.name, kind=_TASK_KIND[self.kind], item_fields=tuple(self.fields),  # type: ignore[arg-type]
            input_template=self.instruction, markers=(prefix,) if prefix else (), target_field=self.target,
            index_fields=tuple(index), render_template=render,
            max_new_tokens=self.max_new_tokens or _MAX_NEW_TOKENS[self.kind], labels=labels,
            label_field=self.target if labels else None, description=self.description or f"defined in config ({self.kind})",
            scale=self.rating_scale, metric=self.metric,
        )


def _placeholders(template: str, where: str) -> tuple[str, ...]:
    """The {field} names a str.format template uses; only plain names (no {x.attr}, {x[0]}, {x!r},
    {x:>5}), so rendering an item can fail on nothing but a missing field."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"{where} {template!r} is not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not _FIELD.match(name) or spec or conversion:
            raise ValueError(f"{where} {template!r}: {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} must be a plain {{field}} name")
        names.append(name)
    return tuple(names)


def _fixed_prefix(template: str) -> str:
    """The literal text before a template's first field: where a question's payload starts."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            break
    return "".join(out).strip()


def register_specs(specs: tuple[TaskSpec, ...], source: str) -> tuple[Task, ...]:
    """Build and register every spec (shared.tasks.TASKS), all or none; one name appears once in `source`."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"task {spec.name!r} is defined twice in {source}; one [[tasks]] table per name")
        seen.add(spec.name)
    return register_tasks([spec.build() for spec in specs])


def load_task_file(path: str | Path) -> tuple[Task, ...]:
    """Register the [[tasks]] tables of a TOML file (a daemon.toml or a file of tasks only; its other
    settings are not read here) and return their Tasks. Every error names the file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML: {e}") from None
    raw = data.get("tasks", [])
    try:
        if not isinstance(raw, list):
            raise ValueError("tasks must be an array of tables: write each task as a [[tasks]] table")
        specs = _coerce("tasks", tuple[TaskSpec, ...], raw)
        return register_specs(specs, str(p))
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
