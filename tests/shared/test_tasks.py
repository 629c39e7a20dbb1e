"""Task objects: inputs, retrieval queries, output parsing, validation."""

from __future__ import annotations

import pytest

from shared.prompting import clip_words
from shared.records import HistoryItem
from shared.tasks import BUILTIN_TASKS, TASKS, get_task, scramble_words

# Payloads contain the task's marker words on purpose: the query must still come back whole.
VALUES = {
    "title": "Deep nets for review: a study",
    "abstract": "We study deep nets. Our article: results are good.",
    "text": "Great strings, review: they stay in tune! article: #music",
    "score": "4",
    "category": "politics",
    "description": "A man walks into a bar. description: funny",
    "tag": "comedy",
    "body": "The reader accepted a body: with a marker and then failed.",
    "subject": "reader: keep payloads that contain a marker",
}


def item_for(task, **over):
    return HistoryItem("i1", {f: over.get(f, VALUES[f]) for f in task.item_fields}, time=3)


PAYLOAD = {"LaMP-1": "title", "LaMP-2N": "text", "LaMP-2M": "description", "LaMP-4": "text", "LaMP-5": "abstract",
           "amazon-title": "text", "synthetic-tag": "description", "commit-title": "body"}


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_make_input_round_trips_through_retrieval_query(name):
    task = TASKS[name]
    item = item_for(task)
    task.validate_item(item, "test")
    query = task.retrieval_query(task.make_input(item))
    if name == "LaMP-7":
        assert query == scramble_words(item.get("text"))
    else:
        assert query == item.get(PAYLOAD.get(name, "text"))
    inp, target = task.item_to_example(item)
    assert inp == task.make_input(item) and target
    assert task.item_text(item) and task.render_item(item)
    assert task.metric_names and task.max_new_tokens > 0


REAL_INPUTS = {
    "LaMP-1": ('For an author who has written the paper with the title "Nets", which reference is related? '
               'Just answer with [1] or [2] without explanation. [1]: "Graph cuts" [2]: "Deep learning"',
               "Graph cuts Deep learning"),
    "LaMP-2N": ("Which category does this article relate to among the following categories? Just answer with the "
                "category name without further explanation. categories: [women, religion, politics] article: Vote now",
                "Vote now"),
    "LaMP-2M": ("Which tag does this movie relate to among the following tags? Just answer with the tag name "
                "without further explanation. tags: [sci-fi, comedy] description: A robot dreams.", "A robot dreams."),
    "LaMP-3": ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
               "without further explanation. review: Works fine.", "Works fine."),
    "LaMP-4": ("Generate a headline for the following article: Markets fell today.", "Markets fell today."),
    "LaMP-5": ("Generate a title for the following abstract of a paper: We propose X: a method.", "We propose X: a method."),
    "LaMP-7": ("Paraphrase the following tweet without any explanation before or after it: so tired today", "so tired today"),
}


@pytest.mark.parametrize("name", list(REAL_INPUTS))
def test_retrieval_query_on_real_lamp_inputs(name):
    text, want = REAL_INPUTS[name]
    assert get_task(name).retrieval_query(text) == want


@pytest.mark.parametrize("name,raw,want", [
    ("LaMP-3", " 4\nbecause it is good", "4"),
    ("LaMP-3", "Rating: 3 out of 5", "3"),
    ("LaMP-3", "I would say four", "I would say four"),  # left for the metric to score as worst
    ("LaMP-3", "10", "10"),
    ("LaMP-1", "[2]", "[2]"),
    ("LaMP-1", "1", "[1]"),
    ("LaMP-1", "Reference [2] is related.", "[2]"),
    ("LaMP-2M", "Comedy.", "comedy"),
    ("LaMP-2M", "The tag is dark comedy", "dark comedy"),
    ("LaMP-2M", "tag: SCI-FI", "sci-fi"),
    ("LaMP-2M", "no idea", "no idea"),
    ("LaMP-2N", "Category: Science & Technology", "science & technology"),
    ("LaMP-4", 'Title: "Markets fall again"\nmore text', "Markets fall again"),
    ("amazon-title", "Headline: Five Stars", "Five Stars"),
    ("LaMP-5", 'A study of "X" nets', 'A study of "X" nets'),
    ("LaMP-7", "  “so tired today”  ", "so tired today"),
])
def test_parse_output(name, raw, want):
    assert get_task(name).parse_output(raw) == want


def test_parsed_outputs_score_as_lamp_would():
    t = get_task("LaMP-3")
    preds = [t.parse_output(x) for x in ["5 stars", "meh"]]
    assert t.score(preds, ["5", "2"]) == {"mae": 1.5, "rmse": pytest.approx((9 / 2) ** 0.5)}
    assert set(get_task("amazon-title").score(["Five Stars"], ["Five Stars"]).values()) == {1.0}


@pytest.mark.parametrize("name,over,field", [
    ("LaMP-3", {"score": "6"}, "score"),
    ("LaMP-3", {"score": "4.5"}, "score"),
    ("LaMP-3", {"text": "   "}, "text"),
    ("LaMP-2M", {"tag": "horror"}, "tag"),
    ("synthetic-tag", {"tag": "violence"}, "tag"),
])
def test_validate_item_names_where_and_field(name, over, field):
    task = get_task(name)
    with pytest.raises(ValueError, match=rf"data\.json record 3: item 'i1' field '{field}'"):
        task.validate_item(item_for(task, **over), "data.json record 3")


def test_validate_item_missing_field_lists_required_fields():
    task = get_task("LaMP-2N")
    item = HistoryItem("x", {"text": "t", "title": "a"})
    with pytest.raises(ValueError, match=r"f\.json: item 'x' has no field 'category'; LaMP-2N items need: text, title, category"):
        task.validate_item(item, "f.json")


def test_rating_targets_are_normalized():
    task = get_task("amazon-rating")
    item = item_for(task, score="5.0")
    task.validate_item(item, "x")
    assert task.item_to_example(item)[1] == "5"


def test_render_item_keeps_the_signal_when_clipped():
    task = get_task("LaMP-3")
    item = item_for(task, text="word " * 200)
    assert clip_words(task.render_item(item), 10).startswith("rated 4:")


def test_scramble_is_deterministic_and_keeps_words():
    tweet = "Can't WAIT for the show tonight!! #live @band"
    s = scramble_words(tweet)
    assert s == scramble_words(tweet)
    assert sorted(s.split()) == sorted(["can't", "wait", "for", "the", "show", "tonight", "#live", "@band"])


def test_registry():
    assert set(BUILTIN_TASKS) == {"LaMP-1", "LaMP-2N", "LaMP-2M", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7",
                                  "amazon-rating", "amazon-title", "commit-title", "synthetic-tag", "synthetic-rating"}
    assert len(get_task("LaMP-2N").labels) == 15 and len(get_task("LaMP-2M").labels) == 15
    assert get_task("synthetic-tag").labels == ("comedy", "romance", "action", "fantasy", "sci-fi", "classic")
    assert get_task("LaMP-1").labels == ("[1]", "[2]")
    assert {t.kind for t in TASKS.values()} == {"classification", "regression", "generation"}
    with pytest.raises(ValueError, match=r"unknown task 'LaMP-9'; valid tasks: LaMP-1, .*synthetic-rating"):
        get_task("LaMP-9")
