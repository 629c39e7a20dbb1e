"""Non-LLM personal baselines (shared/baselines.py) on hand-made histories whose answer is known."""

from __future__ import annotations

import pytest

from shared import baselines as bl
from shared.records import HistoryItem, Query, UserData
from shared.tasks import get_task


def _tag_user(uid: str, tags: list[str], n_queries: int = 2) -> UserData:
    task = get_task("synthetic-tag")
    history = [HistoryItem(f"{uid}-{i}", {"description": f"film {i}", "tag": t}, time=i + 1)
               for i, t in enumerate(tags)]
    queries = [Query(f"{uid}-q{j}", task.make_input(HistoryItem("x", {"description": f"new film {j}", "tag": "comedy"})),
                     "comedy") for j in range(n_queries)]
    return UserData(uid, history, queries)


def _rating_user(uid: str, scores: list[str]) -> UserData:
    task = get_task("synthetic-rating")
    history = [HistoryItem(f"{uid}-{i}", {"text": f"review {i}", "score": s}, time=i + 1) for i, s in enumerate(scores)]
    q = Query(f"{uid}-q", task.make_input(HistoryItem("x", {"text": "a new review", "score": "3"})), "3")
    return UserData(uid, history, [q])


def test_classification_user_and_global_majority():
    task = get_task("synthetic-tag")
    users = [_tag_user("u1", ["action", "comedy", "action"]),
             _tag_user("u2", ["romance", "action", "romance", "action"]),  # tie: the most recent wins
             _tag_user("u3", [])]  # no history: falls back to the global majority
    base = [_tag_user("b1", ["fantasy", "fantasy", "classic"]), _tag_user("b2", ["fantasy", "sci-fi"])]
    out = bl.personal_baselines(task, users, base)
    assert list(out) == [bl.USER_MAJORITY, bl.GLOBAL_MAJORITY]
    assert out[bl.USER_MAJORITY] == {"u1-q0": "action", "u1-q1": "action", "u2-q0": "action", "u2-q1": "action",
                                     "u3-q0": "fantasy", "u3-q1": "fantasy"}
    # From the base users only: the evaluated users' own "action" majority does not count.
    assert set(out[bl.GLOBAL_MAJORITY].values()) == {"fantasy"} and len(out[bl.GLOBAL_MAJORITY]) == 6
    # Without base users, every history counts.
    assert set(bl.personal_baselines(task, users)[bl.GLOBAL_MAJORITY].values()) == {"action"}


def test_regression_user_mean_mode_and_global_majority_score_as_numbers():
    task = get_task("synthetic-rating")
    users = [_rating_user("u1", ["5", "4", "4", "2"]), _rating_user("u2", ["1", "2"])]
    base = [_rating_user("b1", ["3", "3", "5"])]
    out = bl.personal_baselines(task, users, base)
    assert set(out) == {bl.USER_MEAN, bl.USER_MODE, bl.GLOBAL_MAJORITY}
    assert float(out[bl.USER_MEAN]["u1-q"]) == pytest.approx(3.75) and float(out[bl.USER_MEAN]["u2-q"]) == 1.5
    assert out[bl.USER_MODE] == {"u1-q": "4", "u2-q": "2"}  # u2: 1 and 2 tie, 2 is more recent
    assert out[bl.GLOBAL_MAJORITY] == {"u1-q": "3", "u2-q": "3"}
    # The scorer takes the mean as it is: |3.75 - 3| and |1.5 - 3|.
    assert task.score(list(out[bl.USER_MEAN].values()), ["3", "3"])["mae"] == pytest.approx((0.75 + 1.5) / 2)


def test_generation_query_prefix_and_nearest_history():
    task = get_task("LaMP-4")
    history = [HistoryItem("h1", {"text": "the river flooded the old town after storms", "title": "Town floods after storms"}),
               HistoryItem("h2", {"text": "the local team won the cup final on penalties", "title": "Team wins cup"}),
               HistoryItem("h3", {"text": "new bakery opens downtown", "title": "Bakery opens in city centre"})]
    article = "penalties decided the cup final as the local team won again this year"
    query = Query("q1", task.make_input(HistoryItem("x", {"text": article, "title": "-"})), "Team wins cup again")
    user = UserData("u1", history, [query])
    out = bl.personal_baselines(task, [user])
    assert set(out) == {bl.QUERY_PREFIX, bl.NEAREST_HISTORY}
    # Target lengths 4, 3, 5 words: median 4, so the first 4 words of the article (not the instruction).
    assert out[bl.QUERY_PREFIX] == {"q1": "penalties decided the cup"}
    assert out[bl.NEAREST_HISTORY] == {"q1": "Team wins cup"}


def test_median_words_rounds_half_up():
    assert bl.median_words(["a b", "a b c"]) == 3  # median 2.5
    assert bl.median_words([]) == 1


def test_a_task_without_labelled_history_has_no_user_majority():
    """LaMP-1: a history item is a paper the user wrote, not a citation choice."""
    task = get_task("LaMP-1")
    item = HistoryItem("p1", {"title": "A paper", "abstract": "We study things."})
    q = Query("q1", 'For an author who has written the paper with the title "A paper", which reference is '
                    'related? Just answer with [1] or [2] without explanation. [1]: "x" [2]: "y"', "[2]")
    users = [UserData("u1", [item], [q])]
    base = [UserData("b1", [item], [Query("bq1", q.input, "[2]"), Query("bq2", q.input, "[2]"),
                                    Query("bq3", q.input, "[1]")])]
    out = bl.personal_baselines(task, users, base)
    assert out == {bl.GLOBAL_MAJORITY: {"q1": "[2]"}}
    assert bl.personal_baselines(task, users) == {}
