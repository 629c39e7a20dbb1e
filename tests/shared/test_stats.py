"""Bootstrap CIs over users and paired permutation tests (shared/stats.py) against their
definitions: the pooled scorer equals the task's own, index arithmetic equals rescoring, and the
intervals and p-values behave as they must on data whose answer is known."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from shared import stats
from shared.metrics import gain
from shared.tasks import get_task

WORDS = "the a cat dog sat on mat big red small blue ran home".split()


def _users(task, n_users: int, rng: random.Random, max_queries: int = 5):
    """Random golds and two methods' answers, including unparseable / out-of-label answers."""
    golds, a, b = [], [], []
    for _ in range(n_users):
        n = rng.randint(1, max_queries)
        if task.kind == "classification":
            g = [rng.choice(task.labels) for _ in range(n)]
            pa = [rng.choice(task.labels + ("not a label",)) for _ in g]
            pb = [rng.choice(task.labels) for _ in g]
        elif task.kind == "regression":
            g = [rng.choice("12345") for _ in range(n)]
            pa = [rng.choice(["1", "2.5", "3", "no idea", "5"]) for _ in g]
            pb = [rng.choice("12345") for _ in g]
        else:
            g = [" ".join(rng.choices(WORDS, k=5)) for _ in range(n)]
            pa = [" ".join(rng.choices(WORDS, k=4)) for _ in g]
            pb = [" ".join(rng.choices(WORDS, k=3)) for _ in g]
        golds.append(g)
        a.append(pa)
        b.append(pb)
    return golds, a, b


def _flat(x):
    return [y for z in x for y in z]


TASKS = ["synthetic-tag", "LaMP-2N", "synthetic-rating", "LaMP-4"]


@pytest.mark.parametrize("name", TASKS)
def test_pooled_scorer_scores_exactly_like_the_task(name):
    task = get_task(name)
    scorer = stats.pooled_scorer(task)
    rng = random.Random(1)
    for _ in range(5):
        golds, a, _ = _users(task, rng.randint(1, 8), rng)
        want = task.score(_flat(a), _flat(golds))
        got = scorer(_flat(a), _flat(golds))
        assert set(got) == set(want) and all(got[k] == pytest.approx(want[k], abs=1e-12) for k in want)


@pytest.mark.parametrize("name", TASKS)
def test_index_arithmetic_equals_rescoring_every_resample(name):
    """The fast path (per-user sums) and the task's scorer called on each resample's pooled queries
    give the same interval, gain and p-value: the same resampled users, the same pooling."""
    task = get_task(name)
    golds, a, b = _users(task, 7, random.Random(2))
    scorer = stats.pooled_scorer(task)
    for n_perm in (200, 50):  # 2^7 = 128: exact enumeration, then random swaps
        fast = stats.bootstrap_ci(a, golds, scorer, n_boot=200, seed=3)
        slow = stats.bootstrap_ci(a, golds, task.score, n_boot=200, seed=3)
        assert fast.keys() == slow.keys() and all(np.allclose(fast[k], slow[k]) for k in fast)
        fd = stats.paired_difference(a, b, golds, scorer, n_boot=200, n_perm=n_perm, seed=3)
        sd = stats.paired_difference(a, b, golds, task.score, n_boot=200, n_perm=n_perm, seed=3)
        assert all(np.allclose(fd[k], sd[k]) for k in fd)
    point = task.score(_flat(a), _flat(golds))
    assert all(fast[k].mean == pytest.approx(point[k]) for k in point)


def test_interval_contains_the_estimate_and_shrinks_with_more_users():
    task = get_task("synthetic-rating")
    scorer = stats.pooled_scorer(task)
    rng = random.Random(4)
    widths = []
    for n_users in (10, 40, 160):
        golds, a, _ = _users(task, n_users, rng)
        ci = stats.bootstrap_ci(a, golds, scorer, n_boot=1000, seed=0)
        for k, c in ci.items():
            assert c.lo <= c.mean <= c.hi, (n_users, k, c)
        widths.append(ci["mae"].hi - ci["mae"].lo)
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] / widths[2] > 2.5  # about sqrt(16) = 4 for 16 times the users


def test_resamples_draw_users_not_queries():
    """A user whose queries are all wrong stays whole in a resample: with 2 users (all right / all
    wrong) the pooled accuracy of any resample is one of the few values users can make, never a
    mixture of queries."""
    task = get_task("synthetic-tag")
    golds = [["comedy"] * 3, ["romance"] * 5]
    preds = [["comedy"] * 3, ["action"] * 5]
    scorer = stats.pooled_scorer(task)
    s = stats.user_sums(scorer, preds, golds)
    w = stats._multiplicities(stats.resample_users(2, 500, 0), 2)
    acc = scorer.pool(w @ s.sums, w @ s.counts)["accuracy"]
    assert set(np.round(acc, 6)) <= {0.0, 1.0, round(3 / 8, 6)}


def test_identical_methods_have_no_difference_and_p_one():
    task = get_task("LaMP-4")
    golds, a, _ = _users(task, 12, random.Random(5))
    d = stats.paired_difference(a, a, golds, stats.pooled_scorer(task), n_boot=300)
    for k, v in d.items():
        assert v.gain == 0.0 and v.lo == 0.0 and v.hi == 0.0 and v.p == 1.0


def test_a_method_better_for_every_user_wins_with_small_p():
    task = get_task("synthetic-rating")
    rng = random.Random(6)
    for n_users in (10, 30):  # 2^10 = 1024 swaps enumerated exactly; 2^30 drawn
        golds = [[rng.choice("12345") for _ in range(rng.randint(1, 4))] for _ in range(n_users)]
        good = [list(g) for g in golds]  # perfect
        bad = [["1" if x != "1" else "5" for x in g] for g in golds]  # always wrong
        d = stats.paired_difference(good, bad, golds, stats.pooled_scorer(task), n_boot=500, n_perm=2000)
        assert d["mae"].gain > 0 and d["mae"].lo > 0  # lower MAE is a positive gain
        assert d["rmse"].gain > 0 and d["rmse"].lo > 0
        # Only the identity and the full swap are as extreme: 2/1024 exact, 1/2001 drawn.
        assert d["mae"].p == pytest.approx(2 / 1024 if n_users == 10 else 1 / 2001)
        reverse = stats.paired_difference(bad, good, golds, stats.pooled_scorer(task), n_boot=500)
        assert reverse["mae"].gain == pytest.approx(-d["mae"].gain) and reverse["mae"].hi < 0


def test_p_values_of_exchangeable_methods_are_not_small():
    """Two methods that are the same coin: p is roughly uniform, so p < 0.05 about 5% of the time."""
    task = get_task("synthetic-tag")
    scorer = stats.pooled_scorer(task)
    ps = []
    for seed in range(200):
        rng = random.Random(100 + seed)
        golds = [[rng.choice(task.labels) for _ in range(3)] for _ in range(15)]
        a = [[g if rng.random() < 0.5 else "comedy" for g in gs] for gs in golds]
        b = [[g if rng.random() < 0.5 else "comedy" for g in gs] for gs in golds]
        ps.append(stats.paired_difference(a, b, golds, scorer, n_boot=10, n_perm=300, seed=seed)["accuracy"].p)
    ps = np.asarray(ps)
    # Accuracy gains take few values and ties count as extreme, so p is a little conservative.
    assert np.mean(ps < 0.05) <= 0.12
    assert 0.05 <= np.mean(ps < 0.2) <= 0.35
    assert 0.35 <= np.mean(ps) <= 0.75


def test_users_keyed_by_id_are_aligned_and_empty_users_left_out():
    task = get_task("synthetic-tag")
    golds = {"u1": ["comedy"], "u2": ["romance", "action"], "u3": []}
    preds = {"u2": ["romance", "comedy"], "u1": ["comedy"], "u3": []}
    ci = stats.bootstrap_ci(preds, golds, stats.pooled_scorer(task), n_boot=50)
    assert ci["accuracy"].mean == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="user #0 has 2 predictions but 1 golds"):
        stats.bootstrap_ci([["a", "b"]], [["comedy"]], task.score)


def test_gain_is_positive_when_better_whatever_the_direction():
    assert gain(0.8, 0.6, "accuracy") == pytest.approx(0.2)
    assert gain(0.6, 0.8, "mae") == pytest.approx(0.2)
    assert np.allclose(gain(np.array([1.0, 2.0]), np.array([2.0, 1.0]), "rmse"), [1.0, -1.0])


def test_forty_users_nine_methods_take_seconds():
    task = get_task("LaMP-2N")
    rng = random.Random(7)
    golds = [[rng.choice(task.labels) for _ in range(10)] for _ in range(40)]
    preds = {f"m{i}": [[rng.choice(task.labels) for _ in g] for g in golds] for i in range(9)}
    t0 = time.perf_counter()
    out = stats.compare_methods(stats.pooled_scorer(task), preds, golds, ["m0", "m1", "m2"], n_boot=2000, n_perm=2000)
    assert time.perf_counter() - t0 < 10
    assert out["users"] == 40 and out["queries"] == 400 and out["permutation"] == "random"
    assert set(out["vs"]) == {"m0", "m1", "m2"} and set(out["vs"]["m0"]) == set(preds)
    ci = out["ci"]["m3"]["f1"]
    assert ci["lo"] <= ci["mean"] <= ci["hi"]
    assert out["vs"]["m0"]["m0"]["accuracy"] == {"gain": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0}
