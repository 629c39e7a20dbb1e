"""LaMP's metrics against hand-computed values (and sklearn, where it is installed)."""

from __future__ import annotations

import math
import random

import pytest

from shared.metrics import (
    METRIC_DIRECTION, classification_scores, macro_f1, regression_scores, rouge_scores, worst_rating,
)
from shared.tasks import TASKS


def test_macro_f1_counts_a_never_predicted_label_as_zero():
    # a: tp1 fp0 fn1 -> 2/3; b: tp1 fp1 fn1 -> 1/2; c: never gold, never predicted -> 0.
    # "zzz" is outside the label set: a false negative for b, a positive for nothing.
    s = classification_scores(["a", "b", "b", "zzz"], ["a", "a", "b", "b"], ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_classification_strips_whitespace_like_lamp():
    assert classification_scores([" a\n"], ["a"], ["a", "b"]) == {"accuracy": 1.0, "f1": 0.5}


def test_macro_f1_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for _ in range(30):
        n_labels = rng.randint(2, 6)
        gold = [rng.randrange(n_labels) for _ in range(rng.randint(1, 25))]
        pred = [rng.randrange(-1, n_labels) for _ in gold]
        want = sklearn_metrics.f1_score(gold, pred, labels=list(range(n_labels)), average="macro", zero_division=0)
        assert macro_f1(pred, gold, n_labels) == pytest.approx(want)


def test_gold_outside_label_set_is_an_error():
    with pytest.raises(ValueError, match=r"shared/metrics.py.*gold #1 'x' is not a label; labels: a, b"):
        classification_scores(["a", "a"], ["a", "x"], ["a", "b"])


def test_unparseable_rating_scores_as_worst():
    assert worst_rating(2.0) == 5.0 and worst_rating(4.0) == 1.0 and worst_rating(3.0) == 5.0
    s = regression_scores(["4", "I liked it", "2", "nan"], ["5", "2", "2", "4"])
    # errors: 1, |5-2|=3, 0, |1-4|=3
    assert s["mae"] == pytest.approx(7 / 4)
    assert s["rmse"] == pytest.approx(math.sqrt((1 + 9 + 0 + 9) / 4))


def test_rouge_on_known_pairs():
    preds = ["the cat sat", "mat the on"]
    golds = ["the cat sat on the mat", "the cat sat on the mat"]
    # 1: unigram P=1, R=1/2 -> 2/3; LCS 3 -> 2/3.  2: unigram 3 -> 2/3; LCS "the on" = 2 -> P 2/3, R 1/3 -> 4/9.
    s = rouge_scores(preds, golds)
    assert s["rouge-1"] == pytest.approx(2 / 3)
    assert s["rouge-L"] == pytest.approx((2 / 3 + 4 / 9) / 2)
    assert rouge_scores([""], ["a title"]) == {"rouge-1": 0.0, "rouge-L": 0.0}


@pytest.mark.parametrize("fn,args", [(regression_scores, (["1"], ["1", "2"])), (rouge_scores, ([], []))])
def test_length_mismatch_and_empty_input_are_errors(fn, args):
    with pytest.raises(ValueError, match="shared/metrics.py"):
        fn(*args)


def test_every_task_metric_has_a_direction():
    for task in TASKS.values():
        for name in task.metric_names:
            assert METRIC_DIRECTION[name] in ("higher", "lower")
    assert METRIC_DIRECTION["mae"] == "lower" and METRIC_DIRECTION["f1"] == "higher"
