"""LaMP's scores, computed the way LaMP's own evaluator computes them.

LaMP (Salemi et al., arXiv 2304.11406, `eval/eval_task.py`) scores:
- classification: accuracy and macro-F1 over the *full* label set. Predictions and golds are
  stripped and mapped to their label index; anything outside the label set becomes -1, so a
  wrong-format answer counts against the gold's label but never as a positive for any label.
  F1 is sklearn's `f1_score(average="macro", labels=range(len(labels)))`: labels that are never
  predicted and never gold still enter the average with F1 = 0.
- regression (ratings 1-5): MAE and RMSE; a prediction that does not parse as a number is
  scored as the rating farthest from the gold (1 or 5; the ends of a configured task's own scale), never silently dropped.
- generation: ROUGE-1 and ROUGE-L F-measure from HF `evaluate`'s "rouge" (rouge_score, no
  stemmer, default tokenizer), aggregated as the mean over examples.

Only numpy and rouge_score are used, so scoring runs anywhere the client runs.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np

# Which way is better, per metric key; callers use it to sign relative improvements.
METRIC_DIRECTION: dict[str, str] = {
    "accuracy": "higher",
    "f1": "higher",
    "mae": "lower",
    "rmse": "lower",
    "rouge-1": "higher",
    "rouge-L": "higher",
}
# The best value each metric can take: a model that scores it cannot be beaten.
METRIC_BEST: dict[str, float] = {"accuracy": 1.0, "f1": 1.0, "mae": 0.0, "rmse": 0.0, "rouge-1": 1.0, "rouge-L": 1.0}

# Per-user scores combined over users, weighted by query counts, equal the score of all queries
# pooled when they are means (accuracy, MAE, ROUGE); a root-mean-square error pools as the root
# of the weighted mean of its squares instead.
ROOT_MEAN_SQUARE: frozenset[str] = frozenset({"rmse"})


def gain(value, reference, metric: str):
    """Improvement of `value` over `reference` in the metric's own units, positive = better
    whatever the metric's direction (an MAE that drops by 0.2 is a gain of +0.2). Works on floats
    and on numpy arrays alike, so bootstrap resamples are signed by the same rule."""
    sign = 1.0 if METRIC_DIRECTION.get(metric, "higher") == "higher" else -1.0
    return sign * (value - reference)


def _check_lengths(preds: Sequence[str], golds: Sequence[str], metric: str) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"shared/metrics.py {metric}: {len(preds)} predictions but {len(golds)} golds")
    if not preds:
        # An empty mean is NaN, which would then poison every aggregate it enters.
        raise ValueError(f"shared/metrics.py {metric}: nothing to score (0 predictions)")


# ---------------------------------------------------------------------------------------------
# Classification


def macro_f1(pred_idx: Sequence[int], gold_idx: Sequence[int], n_labels: int) -> float:
    """Macro-F1 over labels 0..n_labels-1, equal to sklearn's
    f1_score(gold, pred, labels=range(n_labels), average="macro", zero_division=0).

    Per label k: F1 = 2tp / (2tp + fp + fn), and 0 when the denominator is 0 (a label that is
    neither gold nor predicted). Index -1 (outside the label set) is never a positive, so it only
    ever adds false negatives to the gold label.
    """
    p = np.asarray(pred_idx, dtype=np.int64)
    g = np.asarray(gold_idx, dtype=np.int64)
    scores = np.zeros(n_labels, dtype=np.float64)
    for k in range(n_labels):
        tp = int(np.sum((p == k) & (g == k)))
        fp = int(np.sum((p == k) & (g != k)))
        fn = int(np.sum((p != k) & (g == k)))
        denom = 2 * tp + fp + fn
        scores[k] = 0.0 if denom == 0 else 2.0 * tp / denom
    return float(scores.mean()) if n_labels else 0.0


def label_indices(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, gold) label indices per query, as LaMP maps them: stripped, -1 outside the label
    set for a prediction; a gold outside the label set is an error."""
    _check_lengths(preds, golds, "classification")
    labels = list(labels)
    index = {label: i for i, label in enumerate(labels)}
    gold_idx = []
    for i, gold in enumerate(golds):
        g = gold.strip()
        if g not in index:
            # LaMP would map it to -1 and let -1 == -1 count as correct; a gold outside the label
            # set is a data error, so say so instead of scoring it.
            raise ValueError(
                f"shared/metrics.py classification: gold #{i} {gold!r} is not a label; labels: {', '.join(labels)}"
            )
        gold_idx.append(index[g])
    pred_idx = [index.get(p.strip(), -1) for p in preds]
    return np.asarray(pred_idx, dtype=np.int64), np.asarray(gold_idx, dtype=np.int64)


def classification_scores(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """{"accuracy", "f1"}: exact label match after stripping whitespace, as LaMP does."""
    pred_idx, gold_idx = label_indices(preds, golds, labels)
    accuracy = float(np.mean(pred_idx == gold_idx))
    return {"accuracy": accuracy, "f1": macro_f1(pred_idx, gold_idx, len(labels))}


# ---------------------------------------------------------------------------------------------
# Regression


def _as_number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except (TypeError, ValueError):
        return None
    # LaMP uses float() as is; "nan"/"inf" parse too but would make the mean meaningless.
    return value if math.isfinite(value) else None


def worst_rating(gold: float, scale: tuple[int, int] = (1, 5)) -> float:
    """The rating farthest from `gold` on the scale (LaMP's penalty for an unparseable answer;
    LaMP's scale is 1-5, a task defined in config may declare another)."""
    low, high = float(scale[0]), float(scale[1])
    return low if abs(low - gold) > abs(high - gold) else high


def rating_errors(preds: Sequence[str], golds: Sequence[str], scale: tuple[int, int] = (1, 5)) -> np.ndarray:
    """Prediction minus gold per query; an unparseable prediction counts as the worst rating."""
    _check_lengths(preds, golds, "regression")
    gold_vals = []
    for i, gold in enumerate(golds):
        value = _as_number(gold)
        if value is None:
            raise ValueError(f"shared/metrics.py regression: gold #{i} {gold!r} is not a number")
        gold_vals.append(value)
    pred_vals = []
    for pred, gold in zip(preds, gold_vals):
        value = _as_number(pred)
        pred_vals.append(worst_rating(gold, scale) if value is None else value)
    return np.asarray(pred_vals, dtype=np.float64) - np.asarray(gold_vals, dtype=np.float64)


def regression_scores(preds: Sequence[str], golds: Sequence[str], scale: tuple[int, int] = (1, 5)) -> dict[str, float]:
    """{"mae", "rmse"} over ratings (1-5 unless `scale` says otherwise); unparseable predictions
    score as the worst rating."""
    err = rating_errors(preds, golds, scale)
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2)))}


# ---------------------------------------------------------------------------------------------
# Generation


@lru_cache(maxsize=1)
def _rouge_scorer():
    # Imported lazily: only generation tasks need it. Settings are evaluate's "rouge" defaults.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def rouge_per_query(preds: Sequence[str], golds: Sequence[str]) -> dict[str, np.ndarray]:
    """{"rouge-1", "rouge-L"}: the F-measure of each example."""
    _check_lengths(preds, golds, "generation")
    scorer = _rouge_scorer()
    r1, rl = [], []
    for pred, gold in zip(preds, golds):
        s = scorer.score(gold.strip(), pred.strip())  # (target, prediction) order
        r1.append(s["rouge1"].fmeasure)
        rl.append(s["rougeL"].fmeasure)
    return {"rouge-1": np.asarray(r1, dtype=np.float64), "rouge-L": np.asarray(rl, dtype=np.float64)}


def rouge_scores(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """{"rouge-1", "rouge-L"}: mean F-measure over examples.

    evaluate's use_aggregator=True reports rouge_score's BootstrapAggregator "mid", a bootstrap
    estimate of exactly this mean; we take the mean itself so scores are deterministic.
    """
    return {k: float(np.mean(v)) for k, v in rouge_per_query(preds, golds).items()}
