"""LaMP task definitions: one small object per task.

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
from typing import Literal, Sequence

from . import metrics
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
_RATING_DIGIT = re.compile(r"(?<!\d)[1-5](?!\d)")


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


def _unquote(text: str) -> str:
    """Strip quotes that wrap the whole answer (only matched pairs, so 'A "B"' keeps its quote)."""
    while len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def _norm_label(text: str) -> str:
    # "[1]" and "1", "Comedy." and "comedy" are the same answer.
    return text.strip().strip(" \t\"'`.,;:!*()[]{}").lower()


def _rating_value(text: str) -> str | None:
    """'4', '4.0' -> '4'; anything that is not a whole rating 1-5 -> None."""
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return str(int(value)) if value in (1.0, 2.0, 3.0, 4.0, 5.0) else None


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

    @property
    def metric_names(self) -> tuple[str, ...]:
        return _METRIC_NAMES[self.kind]

    # -- questions and training pairs -------------------------------------------------------

    def make_input(self, item: HistoryItem) -> str:
        """The question whose answer is this item's target, worded like the task's queries."""
        return self.input_template.format_map(dict(item.fields))

    def item_target(self, item: HistoryItem) -> str:
        value = item.get(self.target_field).strip()
        if self.kind == "regression":
            return _rating_value(value) or value
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
        """A model's generated text as a prediction the metric can score."""
        line = _first_line(text)
        if self.kind == "classification":
            return self._parse_label(line)
        if self.kind == "regression":
            m = _RATING_DIGIT.search(line)
            # No rating found: keep the raw text, which the metric scores as the worst rating.
            return m.group(0) if m else line
        return _unquote(_ANSWER_PREFIX.sub("", _unquote(line)))

    def _parse_label(self, line: str) -> str:
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
        return best[2] if best else line

    def score(self, preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
        if self.kind == "classification":
            assert self.labels is not None
            return metrics.classification_scores(preds, golds, self.labels)
        if self.kind == "regression":
            return metrics.regression_scores(preds, golds)
        return metrics.rouge_scores(preds, golds)

    # -- validation -------------------------------------------------------------------------

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
        if self.kind == "regression" and _rating_value(value) is None:
            raise ValueError(f"{where}: rating {value!r} is not a whole number 1-5")
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
        description=description,
    )


def _movie_tag_task(name: str, labels: tuple[str, ...], description: str) -> Task:
    return Task(
        name=name, kind="classification", item_fields=("description", "tag"),
        input_template=_tag_question("movie", "tag", "tags", labels, "description:", "description"), markers=("description:",),
        target_field="tag", index_fields=("description",), render_template="tagged {tag}: {description}",
        max_new_tokens=8, labels=labels, label_field="tag", description=description,
    )


_ALL: tuple[Task, ...] = (
    CitationTask(
        name="LaMP-1", kind="classification", item_fields=("title", "abstract"),
        input_template="Write an abstract for the paper titled: {title}", markers=("titled:",),
        target_field="abstract", index_fields=("title", "abstract"), render_template='wrote the paper "{title}"',
        max_new_tokens=4, labels=("[1]", "[2]"), description="personalized citation identification",
    ),
    Task(
        name="LaMP-2N", kind="classification", item_fields=("text", "title", "category"),
        input_template=_tag_question("news article", "category", "categories", NEWS_CATEGORIES, "article:", "text"), markers=("article:",),
        target_field="category", index_fields=("title", "text"), render_template="filed under {category}: {title}. {text}",
        max_new_tokens=8, labels=NEWS_CATEGORIES, label_field="category",
        description="personalized news categorization",
    ),
    _movie_tag_task("LaMP-2M", MOVIE_TAGS, "personalized movie tagging"),
    _rating_task("LaMP-3", "personalized product rating"),
    Task(
        name="LaMP-4", kind="generation", item_fields=("text", "title"),
        input_template="Write a headline for the following news article: {text}", markers=("article:", ":"),
        target_field="title", index_fields=("title", "text"), render_template='headline "{title}" for: {text}',
        max_new_tokens=24, description="personalized news headline generation",
    ),
    Task(
        name="LaMP-5", kind="generation", item_fields=("title", "abstract"),
        input_template="Write a title for the following abstract of a paper: {abstract}", markers=(":",),
        target_field="title", index_fields=("title", "abstract"), render_template='title "{title}" for: {abstract}',
        max_new_tokens=24, description="personalized scholarly title generation",
    ),
    TweetTask(
        name="LaMP-7", kind="generation", item_fields=("text",),
        input_template="Rewrite the following words as a tweet in your own style, without any explanation "
        "before or after it: {text}",
        markers=(":",), target_field="text", index_fields=("text",), render_template="{text}",
        max_new_tokens=64, description="personalized tweet paraphrasing",
    ),
    _rating_task("amazon-rating", "Amazon musical-instrument review -> the reviewer's star rating"),
    Task(
        name="amazon-title", kind="generation", item_fields=("text", "title"),
        input_template="Write a short title for the following product review: {text}", markers=("review:", ":"),
        target_field="title", index_fields=("title", "text"), render_template='titled "{title}": {text}',
        max_new_tokens=24, description="Amazon musical-instrument review -> the reviewer's review title",
    ),
    _movie_tag_task("synthetic-tag", SYNTHETIC_TAGS, "synthetic movie tagging with a planted favourite tag"),
    _rating_task("synthetic-rating", "synthetic reviews with a planted per-user rating habit"),
)

TASKS: dict[str, Task] = {t.name: t for t in _ALL}


def get_task(name: str | Task) -> Task:
    """The task called `name` (a Task passes through); ValueError listing valid names otherwise."""
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"shared/tasks.py: unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None
