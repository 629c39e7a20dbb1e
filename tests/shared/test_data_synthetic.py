"""The synthetic task: deterministic, well-formed, and its planted habit is learnable."""

from __future__ import annotations

import pytest

from shared.data import make_synthetic, oracle_predict, oracle_scores, read_lamp, write_lamp
from shared.tasks import get_task


@pytest.mark.parametrize("name", ["synthetic-tag", "synthetic-rating"])
def test_deterministic_given_seed(name):
    a = make_synthetic(name, 5, 3, (4, 8), 2, seed=7)
    assert a == make_synthetic(name, 5, 3, (4, 8), 2, seed=7)
    assert a != make_synthetic(name, 5, 3, (4, 8), 2, seed=8)


@pytest.mark.parametrize("name", ["synthetic-tag", "synthetic-rating"])
def test_shape_and_validity(name):
    task = get_task(name)
    ds = make_synthetic(name, n_base_users=6, n_eval_users=4, history_size=(5, 9), n_queries=3, seed=1)
    assert ds.task == name and len(ds.base_users) == 6 and len(ds.eval_users) == 4
    assert not {u.user_id for u in ds.base_users} & {u.user_id for u in ds.eval_users}
    for u in ds.base_users + ds.eval_users:
        assert 5 <= len(u.history) <= 9 and len(u.queries) == 3
        times = [h.time for h in u.history]
        assert times == sorted(times)
        for h in u.history:
            task.validate_item(h, u.user_id)
            words = len(h.get(task.index_fields[0]).split())
            assert 12 <= words <= 30
        for q in u.queries:
            task.validate_target(q.target, q.id)
            assert task.retrieval_query(q.input)
    assert all(len(u.history) == 4 for u in make_synthetic(name, 2, 2, 4, 1, seed=0).eval_users)


@pytest.mark.parametrize("name", ["synthetic-tag", "synthetic-rating"])
def test_oracle_beats_constant_baseline(name):
    ds = make_synthetic(name, n_base_users=30, n_eval_users=30, history_size=(8, 12), n_queries=4, seed=0)
    oracle, constant = oracle_scores(ds)
    key = get_task(name).metric_names[0]
    if name == "synthetic-tag":
        assert oracle[key] > 0.7 and oracle[key] > constant[key] + 0.3
    else:
        assert oracle[key] < 0.4 and oracle[key] < constant[key] - 0.5
    assert ds.notes and "oracle" in ds.notes[0]
    assert oracle_predict(ds.eval_users[0]) == [oracle_predict(ds.eval_users[0])[0]] * 4


def test_exports_as_lamp_and_reads_back(tmp_path):
    ds = make_synthetic("synthetic-rating", 2, 2, 4, 2, seed=3)
    write_lamp(tmp_path, "dev", ds.eval_users, ds.task)
    assert read_lamp(tmp_path, "dev", ds.task) == ds.eval_users


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"task='LaMP-3' is not synthetic"):
        make_synthetic("LaMP-3", 1, 1, 4, 1)
    with pytest.raises(ValueError, match=r"history_size=\(5, 2\)"):
        make_synthetic("synthetic-tag", 1, 1, (5, 2), 1)
