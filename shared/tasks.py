"""Task definitions: one small object per task (the LaMP tasks, ours, and those a config defines).

A task knows how to turn a history item into a question and its answer (the personal training
pairs), how to show an item as context in a prompt, which text a retriever indexes and which part
of a question it searches with, how to read a model's answer, and how LaMP scores it.

Inputs follow the LaMP benchmark's task definitions (Salemi et al., arXiv 2304.11406); profile
item fields follow the paper per task. Every instruction ends with a marker ("review:",
"article:", ...) after which the payload text follows, so `retrieval_query` can cut the payload
out of both real LaMP inputs and the inputs `make_input` builds.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from . import metrics
from .prompting import first_line
from .records import HistoryItem

Kind = Literal["classification", "regression", "generation"]

_METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1"),
    "regression": ("mae", "rmse"),
    "generation": ("rouge-1", "rouge-L"),
}

RATINGS = ("1", "2", "3", "4", "5")
NEWS_CATEGORIES = (
    "women", "religion", "politics", "style & beauty", "entertainment", "culture & arts", "sports",
    "science & technology", "travel", "business", "crime", "education", "healthy living", "parents",
    "food & drink",
)
MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
    "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story",
)
SYNTHETIC_TAGS = ("comedy", "romance", "action", "fantasy", "sci-fi", "classic")

# Prefixes small models like to put before a generated answer ("Title: ...").
_ANSWER_PREFIX = re.compile(
    r"^\s*(?:the\s+)?(?:title|headline|paraphrase[d]?(?:\s+tweet)?|tweet|answer|output|abstract|summary)\s*:\s*",
    re.IGNORECASE,
)
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}
_WHOLE_NUMBER = re.compile(r"(?<!\d)(?:0|[1-9]\d*)(?!\d)")  # "05" is not a rating


def _unquote(text: str) -> str:
    """Strip quotes that wrap the whole answer (only matched pairs, so 'A "B"' keeps its quote)."""
    while len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def _norm_label(text: str) -> str:
    # "[1]" and "1", "Comedy." and "comedy" are the same answer.
    return text.strip().strip(" \t\"'`.,;:!*()[]{}").lower()


def _rating_value(text: str, scale: tuple[int, int] = (1, 5)) -> str | None:
    """'4', '4.0' -> '4'; anything that is not a whole rating on `scale` (1-5) -> None."""
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() and scale[0] <= value <= scale[1] else None


def scramble_words(text: str) -> str:
    """Lowercased, punctuation-stripped words of `text` in a shuffled (but reproducible) order.

    LaMP-7 history items are bare tweets: "paraphrase this tweet" with the tweet as its own answer
    teaches only copying. Restoring a tweet from its scrambled, de-styled words instead makes the
    model produce this user's word order, casing and punctuation, which is the personal signal.
    The shuffle is seeded by a CRC of the text (not hash(), which varies per process).
    """
    words = [w.strip(".,;:!?\"'()[]{}\u201c\u201d\u2018\u2019").lower() for w in text.split()]
    words = [w for w in words if w]
    random.Random(zlib.crc32(text.encode("utf-8"))).shuffle(words)
    return " ".join(words)


@dataclass(frozen=True)
class Task:
    """One LaMP(-style) task. Instances are immutable and shared; see TASKS."""

    name: str
    kind: Kind
    item_fields: tuple[str, ...]  # required fields of a history item
    input_template: str  # str.format template over item fields; the payload follows a marker
    markers: tuple[str, ...]  # tried in order; the retrieval query is the text after the first hit
    target_field: str  # item field that answers make_input(item)
    index_fields: tuple[str, ...]  # item fields a retriever indexes, joined by spaces
    render_template: str  # an item as prompt context; the short personal signal comes first so
    #                       clipping a long item to N words (prompting.clip_words) keeps it
    max_new_tokens: int
    labels: tuple[str, ...] | None = None
    label_field: str | None = None  # item field holding a label/rating that must be valid
    description: str = ""
    scale: tuple[int, int] = (1, 5)  # regression: the lowest and highest whole rating
    metric: str = ""  # the metric that selects and reports first; empty: the kind's first
    example: tuple[tuple[str, str], ...] = ()  # one item's fields, shown by `oppu tasks`

    @property
    def metric_names(self) -> tuple[str, ...]:
        names = _METRIC_NAMES[self.kind]
        return (self.metric, *(n for n in names if n != self.metric)) if self.metric else names

    def example_fields(self) -> dict[str, str]:
        """An item a user could add: the task's own example, else each field named in angle brackets
        with a valid label or rating where one is required."""
        if self.example:
            return dict(self.example)
        out = {f: f"<{f}>" for f in self.item_fields}
        if self.label_field is not None and self.labels:
            out[self.label_field] = self.labels[-1]
        return out

    # -- questions and training pairs -------------------------------------------------------

    def make_input(self, item: HistoryItem) -> str:
        """The question whose answer is this item's target, worded like the task's queries."""
        return self.input_template.format_map(dict(item.fields))

    def item_target(self, item: HistoryItem) -> str:
        value = item.get(self.target_field).strip()
        if self.kind == "regression":
            return _rating_value(value, self.scale) or value
        return value

    def item_to_example(self, item: HistoryItem) -> tuple[str, str]:
        """(input, target) personal-training pair from one history item."""
        return self.make_input(item), self.item_target(item)

    # -- retrieval and prompts --------------------------------------------------------------

    def render_item(self, item: HistoryItem) -> str:
        return self.render_template.format_map(dict(item.fields))

    def item_text(self, item: HistoryItem) -> str:
        return " ".join(item.get(f).strip() for f in self.index_fields if item.fields.get(f))

    def retrieval_query(self, query_input: str) -> str:
        """The payload of a query input (first occurrence of the first marker found, as LaMP does,
        so a payload that itself contains the marker is kept whole); the whole input otherwise."""
        for marker in self.markers:
            at = query_input.find(marker)
            if at >= 0:
                return query_input[at + len(marker):].strip()
        return query_input.strip()

    # -- answers and scores -----------------------------------------------------------------

    def parse_output(self, text: str) -> str:
        """A model's generated text as a prediction the metric can score: its answer, else (no
        label, no rating on the scale) the raw first line, which the metric scores as wrong or as
        the worst rating."""
        answer = self.parse_answer(text)
        return answer if answer is not None else first_line(text)

    def parse_answer(self, text: str) -> str | None:
        """The answer in a model's generated text: a label, a whole rating on the scale, a text;
        None when the text holds none (what a person is shown instead of a made-up prediction)."""
        line = first_line(text)
        if self.kind == "classification":
            return self._parse_label(line)
        if self.kind == "regression":
            for m in _WHOLE_NUMBER.finditer(line):  # the first whole number on the scale
                if self.scale[0] <= int(m.group(0)) <= self.scale[1]:
                    return m.group(0)
            return None
        return _unquote(_ANSWER_PREFIX.sub("", _unquote(line))) or None

    def answer_kind(self) -> str:
        """What an answer of this task is, for a person: 'a whole rating 1-5', 'one of: ...'."""
        if self.kind == "regression":
            return f"a whole rating {self.scale[0]}-{self.scale[1]}"
        if self.kind == "classification" and self.labels:
            return f"one of: {', '.join(self.labels)}"
        return "free text"

    def _parse_label(self, line: str) -> str | None:
        assert self.labels is not None
        wanted = _norm_label(line)
        for label in self.labels:
            if _norm_label(label) == wanted:
                return label
        # Otherwise the label mentioned first ("Category: politics."); at one position the
        # longest wins, so "dark comedy" is not read as "comedy".
        # A label may also appear without its brackets ("Reference 2" for "[2]").
        low = line.lower()
        best: tuple[int, int, str] | None = None
        for label in self.labels:
            for form in {label.lower(), _norm_label(label)}:
                m = re.search(r"(?<!\w)" + re.escape(form) + r"(?!\w)", low)
                if m and (best is None or (m.start(), -len(m.group(0))) < (best[0], best[1])):
                    best = (m.start(), -len(m.group(0)), label)
        return best[2] if best else None

    def score(self, preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
        if self.kind == "classification":
            assert self.labels is not None
            return metrics.classification_scores(preds, golds, self.labels)
        if self.kind == "regression":
            return metrics.regression_scores(preds, golds, self.scale)
        return metrics.rouge_scores(preds, golds)

    # -- validation -------------------------------------------------------------------------

    def canonical_fields(self, fields: Mapping[str, str]) -> dict[str, str]:
        """The fields as they are stored: the label or rating in the task's own spelling (' 5 ',
        '5.0' -> '5' on the rating scale; ' comedy ' -> 'comedy'), every other field as given.
        A value that is no valid answer stays as it was, for validate_item to refuse with why.
        (Numbers become text before this: shared.records.field_text.)"""
        out = dict(fields)
        name = self.label_field
        value = out.get(name) if name is not None else None
        if not isinstance(value, str):
            return out
        if self.kind == "regression":
            out[name] = _rating_value(value, self.scale) or value  # type: ignore[index]
        elif self.labels is not None and value.strip() in self.labels:
            out[name] = value.strip()  # type: ignore[index]
        return out

    def validate_item(self, item: HistoryItem, where: str) -> None:
        """Raise ValueError naming `where`, the field and the required fields if `item` is unusable."""
        need = ", ".join(self.item_fields)
        for f in self.item_fields:
            value = item.fields.get(f)
            if value is None:
                raise ValueError(f"{where}: item {item.id!r} has no field {f!r}; {self.name} items need: {need}")
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{where}: item {item.id!r} field {f!r} is empty or not text ({value!r}); "
                    f"{self.name} items need non-empty: {need}"
                )
        if self.label_field is not None:
            self._check_answer(item.get(self.label_field), f"{where}: item {item.id!r} field {self.label_field!r}")

    def validate_target(self, target: str, where: str) -> None:
        """Raise ValueError naming `where` if a query's gold answer is not a valid answer."""
        self._check_answer(target, where)

    def _check_answer(self, value: object, where: str) -> None:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: empty or non-text answer {value!r}")
        if self.kind == "regression" and _rating_value(value, self.scale) is None:
            raise ValueError(f"{where}: rating {value!r} is not a whole number {self.scale[0]}-{self.scale[1]}")
        if self.kind == "classification" and self.labels is not None and value.strip() not in self.labels:
            raise ValueError(f"{where}: {value!r} is not a {self.name} label; labels: {', '.join(self.labels)}")


@dataclass(frozen=True)
class CitationTask(Task):
    """LaMP-1. Queries ask which of two papers the author would cite; a history item is a paper
    the user wrote, which has no such choice in it, so (like OPPU) its training pair is
    title -> abstract: writing their abstracts teaches the adapter the user's research topics."""

    _CANDIDATES = re.compile(r'\[1\]:?\s*"(.*)"\s*\[2\]:?\s*"(.*)"\s*$', re.DOTALL)

    def retrieval_query(self, query_input: str) -> str:
        # LaMP ranks the profile against the two candidate references, not the author's title.
        m = self._CANDIDATES.search(query_input)
        if m:
            return f"{m.group(1).strip()} {m.group(2).strip()}"
        return super().retrieval_query(query_input)


@dataclass(frozen=True)
class TweetTask(Task):
    """LaMP-7: see scramble_words for why a tweet's training input is its own scrambled words."""

    def make_input(self, item: HistoryItem) -> str:
        return self.input_template.format(text=scramble_words(item.get("text")))


def _ex(**fields: str) -> tuple[tuple[str, str], ...]:
    return tuple(fields.items())


_REVIEW = "Great strings, they stay in tune for weeks and sound bright."


def _tag_question(what: str, noun: str, nouns: str, labels: Sequence[str], marker: str, field: str) -> str:
    return (
        f"Which {noun} does this {what} belong to, among the following {nouns}? "
        f"Answer with the {noun} name only, without explanation. "
        f"{nouns}: [{', '.join(labels)}] {marker} {{{field}}}"
    )


_RATING_INPUT = (
    "What score from 1 to 5 did the author give with the following review? "
    "Answer with only 1, 2, 3, 4, or 5, without explanation. review: {text}"
)


def _rating_task(name: str, description: str) -> Task:
    return Task(
        name=name, kind="regression", item_fields=("text", "score"), input_template=_RATING_INPUT,
        markers=("review:",), target_field="score", index_fields=("text",),
        render_template="rated {score}: {text}", max_new_tokens=4, labels=RATINGS, label_field="score",
        description=description, example=_ex(text=_REVIEW, score="5"),
    )


def _movie_tag_task(name: str, labels: tuple[str, ...], description: str) -> Task:
    return Task(
        name=name, kind="classification", item_fields=("description", "tag"),
        input_template=_tag_question("movie", "tag", "tags", labels, "description:", "description"), markers=("description:",),
        target_field="tag", index_fields=("description",), render_template="tagged {tag}: {description}",
        max_new_tokens=8, labels=labels, label_field="tag", description=description,
        example=_ex(description="A crew wakes from cryosleep to find their ship drifting far off course.", tag="sci-fi"),
    )


_ALL: tuple[Task, ...] = (
    CitationTask(
        name="LaMP-1", kind="classification", item_fields=("title", "abstract"),
        input_template="Write an abstract for the paper titled: {title}", markers=("titled:",),
        target_field="abstract", index_fields=("title", "abstract"), render_template='wrote the paper "{title}"',
        max_new_tokens=4, labels=("[1]", "[2]"), description="personalized citation identification",
        example=_ex(title="Federated fine-tuning on phones", abstract="We train adapters on-device and share only updates."),
    ),
    Task(
        name="LaMP-2N", kind="classification", item_fields=("text", "title", "category"),
        input_template=_tag_question("news article", "category", "categories", NEWS_CATEGORIES, "article:", "text"), markers=("article:",),
        target_field="category", index_fields=("title", "text"), render_template="filed under {category}: {title}. {text}",
        max_new_tokens=8, labels=NEWS_CATEGORIES, label_field="category",
        description="personalized news categorization",
        example=_ex(text="The city council voted to expand the night bus network.", title="More night buses",
                    category="politics"),
    ),
    _movie_tag_task("LaMP-2M", MOVIE_TAGS, "personalized movie tagging"),
    _rating_task("LaMP-3", "personalized product rating"),
    Task(
        name="LaMP-4", kind="generation", item_fields=("text", "title"),
        input_template="Write a headline for the following news article: {text}", markers=("article:", ":"),
        target_field="title", index_fields=("title", "text"), render_template='headline "{title}" for: {text}',
        max_new_tokens=24, description="personalized news headline generation",
        example=_ex(text="The city council voted to expand the night bus network.", title="Night buses for all"),
    ),
    Task(
        name="LaMP-5", kind="generation", item_fields=("title", "abstract"),
        input_template="Write a title for the following abstract of a paper: {abstract}", markers=(":",),
        target_field="title", index_fields=("title", "abstract"), render_template='title "{title}" for: {abstract}',
        max_new_tokens=24, description="personalized scholarly title generation",
        example=_ex(title="Adapters on phones", abstract="We train adapters on-device and share only updates."),
    ),
    TweetTask(
        name="LaMP-7", kind="generation", item_fields=("text",),
        input_template="Rewrite the following words as a tweet in your own style, without any explanation "
        "before or after it: {text}",
        markers=(":",), target_field="text", index_fields=("text",), render_template="{text}",
        max_new_tokens=64, description="personalized tweet paraphrasing",
        example=_ex(text="Finally tuned the old guitar. Sounds like 1975 again!"),
    ),
    _rating_task("amazon-rating", "Amazon musical-instrument review -> the reviewer's star rating"),
    Task(
        name="amazon-title", kind="generation", item_fields=("text", "title"),
        input_template="Write a short title for the following product review: {text}", markers=("review:", ":"),
        target_field="title", index_fields=("title", "text"), render_template='titled "{title}": {text}',
        max_new_tokens=24, description="Amazon musical-instrument review -> the reviewer's review title",
        example=_ex(text=_REVIEW, title="Bright and stable"),
    ),
    Task(
        name="commit-title", kind="generation", item_fields=("body", "subject"),
        input_template="Write a one-line commit title for the following commit message body: {body}",
        markers=("body:", ":"), target_field="subject", index_fields=("subject", "body"),
        render_template='titled "{subject}": {body}', max_new_tokens=24,
        description="a git author's commit message body -> their commit title (history from `oppu import git`)",
        example=_ex(body="The parser accepted a trailing comma and then failed later with a confusing error.",
                    subject="config: refuse trailing commas where they are read"),
    ),
    _movie_tag_task("synthetic-tag", SYNTHETIC_TAGS, "synthetic movie tagging with a planted favourite tag"),
    _rating_task("synthetic-rating", "synthetic reviews with a planted per-user rating habit"),
)

# The one registry: the built-in tasks, then those a config defines (register_tasks).
TASKS: dict[str, Task] = {t.name: t for t in _ALL}
BUILTIN_TASKS: tuple[str, ...] = tuple(TASKS)


def register_tasks(tasks: Sequence[Task]) -> tuple[Task, ...]:
    """Add tasks defined in a config to TASKS, so get_task finds them wherever they are asked for:
    all of them or, on a ValueError, none. The same definition again is a no-op; a built-in name,
    or a name already defined otherwise, is refused (the caller adds which file)."""
    for task in tasks:
        have = TASKS.get(task.name)
        if have is None or have == task:
            continue
        if task.name in BUILTIN_TASKS:
            raise ValueError(f"task {task.name!r} is a built-in task; give yours another name "
                             f"(built-in: {', '.join(BUILTIN_TASKS)})")
        raise ValueError(f"task {task.name!r} is already defined differently in this process; "
                         "one name, one definition")
    for task in tasks:
        TASKS.setdefault(task.name, task)
    return tuple(TASKS[task.name] for task in tasks)


def get_task(name: str | Task) -> Task:
    """The task called `name` (a Task passes through); ValueError listing valid names otherwise."""
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"shared/tasks.py: unknown task {name!r}; valid tasks: {', '.join(TASKS)}; a task of your "
                         "own is defined in a [[tasks]] table of the daemon's config (docs/daemon.md)") from None


def describe_task(task: Task) -> str:
    """What `oppu tasks` shows of a task: its kind, fields, answers, metrics and an item line a
    user can add (`oppu client add`)."""
    import json
    import string

    asked = [name for _, name, _, _ in string.Formatter().parse(task.input_template) if name]
    # Labels not held by the items (only the queries' answers) are listed on a line of their own.
    answers = task.answer_kind() if task.label_field or task.kind != "classification" else "free text"
    kind = {"regression": "rating"}.get(task.kind, task.kind)
    example = {"id": f"{task.name}-1", "fields": task.example_fields(), "time": 1733000000}
    lines = [
        f"{task.name}  ({kind}; metrics: {', '.join(task.metric_names)})",
        f"  {task.description}" if task.description else "",
        f"  item fields:  {', '.join(task.item_fields)}",
        f"  question from: {', '.join(dict.fromkeys(asked))}   answer: {task.target_field} ({answers})",
        f"  queries are answered with one of: {', '.join(task.labels)}" if task.labels and not task.label_field else "",
        f"  example line: {json.dumps(example, ensure_ascii=False)}",
    ]
    return "\n".join(line for line in lines if line)
