"""Which users a study evaluates: activity levels (tertiles of history size), the selection
rules, and behaviour shift (the half of a user's history least like their queries)."""

import pytest

from shared.config import DataSpec
from shared.data import load_dataset, topic_split
from shared.data.selection import activity_levels, choose_users
from shared.records import HistoryItem, Query, UserData


def test_activity_levels_are_tertiles_of_history_size():
    sizes = {f"u{i}": s for i, s in enumerate([3, 4, 5, 10, 11, 12, 30, 40, 50])}
    levels = activity_levels(sizes)
    assert [levels[f"u{i}"] for i in range(9)] == ["low"] * 3 + ["medium"] * 3 + ["high"] * 3


def test_equal_sizes_share_a_level():
    levels = activity_levels({"a": 5, "b": 5, "c": 5, "d": 5, "e": 9, "f": 20})
    assert levels["a"] == levels["b"] == levels["c"] == levels["d"] == "low"
    assert levels["f"] == "high"


def test_selection_rules():
    sizes = {f"u{i:02d}": s for i, s in enumerate([3, 4, 5, 6, 10, 11, 12, 13, 30, 40, 50, 60])}
    assert choose_users(sizes, 3, "most-history", 0) == ["u11", "u10", "u09"]
    levels = activity_levels(sizes)
    picked = choose_users(sizes, 6, "activity", seed=1)
    assert len(set(picked)) == 6 and sorted(levels[u] for u in picked) == ["high"] * 2 + ["low"] * 2 + ["medium"] * 2
    assert choose_users(sizes, 6, "activity", seed=1) == picked  # seeded
    assert choose_users(sizes, 6, "activity", seed=2) != picked
    rnd = choose_users(sizes, 4, "random", seed=3)
    assert len(set(rnd)) == 4 and rnd == choose_users(sizes, 4, "random", seed=3)
    with pytest.raises(ValueError, match="most-history, random, activity"):
        choose_users(sizes, 2, "busiest", 0)


def test_activity_selection_on_real_data_records_each_users_level():
    ds = load_dataset(DataSpec(task="amazon-rating", source="real", users=6, base_users=5, min_history=4,
                               max_history=40, queries=1, select="activity", seed=0))
    assert len(ds.eval_users) == 6
    levels = [ds.levels[u.user_id] for u in ds.eval_users]
    assert sorted(levels) == ["high", "high", "low", "low", "medium", "medium"]
    size = {lv: [len(u.history) for u in ds.eval_users if ds.levels[u.user_id] == lv] for lv in ("low", "high")}
    assert max(size["low"]) < min(size["high"])


def _item(i, text):
    return HistoryItem(f"h{i}", {"text": text, "score": "5"}, time=i)


def test_behaviour_shift_keeps_the_history_least_like_the_queries():
    user = UserData("u", [_item(0, "guitar strings bright tone"), _item(1, "microphone stand sturdy"),
                          _item(2, "guitar strings last long"), _item(3, "cable for keyboard amp")],
                    [Query("q", "Rate this review: new guitar strings sound bright", "5")])
    shifted, similar = topic_split(user, "shifted"), topic_split(user, "similar")
    assert [h.id for h in similar.history] == ["h0", "h2"]  # chronological order kept
    assert [h.id for h in shifted.history] == ["h1", "h3"]
    assert shifted.queries == user.queries


def test_history_topics_option_applies_to_evaluated_users_only():
    spec = dict(task="amazon-rating", source="real", users=2, base_users=3, min_history=8, max_history=100, queries=2)
    full = load_dataset(DataSpec(**spec))
    shifted = load_dataset(DataSpec(**spec, history_topics="shifted"))
    for a, b in zip(full.eval_users, shifted.eval_users):
        assert len(b.history) == (len(a.history) + 1) // 2
        assert {h.id for h in b.history} < {h.id for h in a.history}
    assert [len(u.history) for u in full.base_users] == [len(u.history) for u in shifted.base_users]
    assert any("history_topics=shifted" in n for n in shifted.notes)
