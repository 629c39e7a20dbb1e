"""The Amazon-review tasks: reviewer split isolation, time order, targets (skipped without data)."""

from __future__ import annotations

import pytest

from shared.data import build_amazon, default_data_root
from shared.data.amazon import read_reviews, reviews_path
from shared.tasks import get_task

HAVE_DATA = reviews_path().is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"{reviews_path()} not present (set OPPU_DATA_DIR)")


@pytest.fixture(scope="module")
def times():
    return {f"{r.reviewer}-{r.asin}": r.time for r in read_reviews(reviews_path())}


@needs_data
@pytest.mark.parametrize("task", ["amazon-rating", "amazon-title"])
def test_split_isolation_and_time_order(task, times):
    ds = build_amazon(task, n_eval_users=6, n_base_users=30, n_queries=2, min_history=10, max_words=40)
    assert len(ds.eval_users) == 6 and len(ds.base_users) == 30
    eval_ids = {u.user_id for u in ds.eval_users}
    assert not eval_ids & {u.user_id for u in ds.base_users}
    base_reviews = {x.id for u in ds.base_users for x in [*u.history, *u.queries]}
    spec = get_task(task)
    for u in ds.eval_users + ds.base_users:
        assert len(u.queries) == 2 and u.history
        # Every item is the user's own review (ids are reviewerID-asin).
        assert all(x.id.split("-")[0] == u.user_id for x in [*u.history, *u.queries])
        hist_times = [h.time for h in u.history]
        assert hist_times == sorted(hist_times)
        assert hist_times == [times[h.id] for h in u.history]
        assert max(hist_times) < min(times[q.id] for q in u.queries)  # strictly earlier
        for h in u.history:
            spec.validate_item(h, u.user_id)
            assert len(h.get("text").split()) <= 40
        for q in u.queries:
            spec.validate_target(q.target, q.id)
            assert spec.retrieval_query(q.input)
    for u in ds.eval_users:
        assert len(u.history) >= 10
        assert not {x.id for x in [*u.history, *u.queries]} & base_reviews
    assert any("skipped for empty reviewText" in n for n in ds.notes)


@needs_data
def test_selection_rules():
    most = build_amazon("amazon-rating", n_eval_users=4, n_base_users=0, min_history=5)
    lengths = [len(u.history) for u in most.eval_users]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] >= 30 and most.base_users == []
    r1 = build_amazon("amazon-rating", n_eval_users=4, n_base_users=5, select="random", min_history=5, seed=1)
    r2 = build_amazon("amazon-rating", n_eval_users=4, n_base_users=5, select="random", min_history=5, seed=1)
    assert r1 == r2 and [u.user_id for u in r1.eval_users] != [u.user_id for u in most.eval_users]


@needs_data
def test_targets_come_from_the_review():
    rating = build_amazon("amazon-rating", n_eval_users=2, n_base_users=0)
    assert {q.target for u in rating.eval_users for q in u.queries} <= {"1", "2", "3", "4", "5"}
    title = build_amazon("amazon-title", n_eval_users=2, n_base_users=0)
    assert all(q.target and q.target == q.target.strip() for u in title.eval_users for q in u.queries)


def test_missing_file_says_how_to_set_the_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reviews_Musical_Instruments_5.json.gz.*OPPU_DATA_DIR"):
        build_amazon("amazon-rating", data_root=tmp_path)


def test_data_root_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("OPPU_DATA_DIR", raising=False)
    assert default_data_root().parts[-2:] == ("shared", "data")
    monkeypatch.setenv("OPPU_DATA_DIR", str(tmp_path))
    assert default_data_root() == tmp_path
    with pytest.raises(ValueError, match=r"task='amazon-tags'; choose from amazon-rating, amazon-title"):
        build_amazon("amazon-tags")
