"""Non-LLM personal baselines: what a user's own history predicts without any model.

A personalized LLM is only worth its cost if it beats these. Each baseline answers every query of
an evaluated user from that user's own history (and, for the global majority, from the histories
of the base users, who are never evaluated), so its predictions are scored by the task's own
scorer next to the LLM methods:

  classification  user majority: the label the user gave most often (ties: the most recent)
                  global majority: the label most frequent in the base users' histories
  regression      user mean: the user's mean rating, as a number (LaMP's MAE/RMSE take any number)
                  user mode: the rating the user gave most often (ties: the most recent)
                  global majority: the rating most frequent in the base users' histories
  generation      query prefix: the first N words of the query's payload (the text after the
                  task's marker), N = the user's median target length in words
                  nearest history: the target of the history item BM25 ranks first for the query

A history item's answer is `task.item_to_example(item)[1]`. A classification task whose history
items carry no label (LaMP-1: papers, not citation choices) has no personal label baseline; the
global majority then comes from the base users' query answers, which are never evaluated either.

Predictions are strings keyed by query id, like an LLM method's.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np

from .records import HistoryItem, UserData
from .retrieval import BM25Retriever, InMemoryHistoryStore

PREFIX = "baseline: "
USER_MAJORITY = PREFIX + "user majority"
GLOBAL_MAJORITY = PREFIX + "global majority"
USER_MEAN = PREFIX + "user mean"
USER_MODE = PREFIX + "user mode"
QUERY_PREFIX = PREFIX + "query prefix"
NEAREST_HISTORY = PREFIX + "nearest history (BM25)"


def is_baseline(method: str) -> bool:
    return method.startswith(PREFIX)


def _answers(task: Any, history: Sequence[HistoryItem]) -> list[str]:
    """The valid answers (labels or whole ratings) in a history, oldest first."""
    out = []
    for item in history:
        try:
            answer = task.item_to_example(item)[1]
        except (KeyError, ValueError):
            continue
        if task.labels is None or answer in task.labels:
            out.append(answer)
    return out


def most_frequent(answers: Sequence[str], order: Sequence[str] | None = None) -> str | None:
    """The most frequent answer. Ties go to the one given most recently (the end of `answers`),
    or, with `order`, to the one listed first there."""
    if not answers:
        return None
    counts = Counter(answers)
    top = max(counts.values())
    tied = [a for a in counts if counts[a] == top]
    if order is not None:
        rank = {a: i for i, a in enumerate(order)}
        return min(tied, key=lambda a: rank.get(a, len(rank)))
    last = {a: i for i, a in enumerate(answers)}
    return max(tied, key=lambda a: last[a])


def global_majority(task: Any, base_users: Sequence[UserData], users: Sequence[UserData] = ()) -> str | None:
    """The most frequent answer in the base users' histories; else in their (never evaluated)
    queries' answers; else in the evaluated users' histories. Ties: the task's label order."""
    base_history = [a for u in base_users for a in _answers(task, u.history)]
    if base_history:
        return most_frequent(base_history, task.labels)
    base_queries = [q.target.strip() for u in base_users for q in u.queries
                    if q.target and (task.labels is None or q.target.strip() in task.labels)]
    if base_queries:
        return most_frequent(base_queries, task.labels)
    return most_frequent([a for u in users for a in _answers(task, u.history)], task.labels)


def median_words(texts: Sequence[str]) -> int:
    """The median length in words, rounded half up, at least 1."""
    if not texts:
        return 1
    return max(1, math.floor(float(np.median([len(t.split()) for t in texts])) + 0.5))


def query_prefix(task: Any, user: UserData) -> dict[str, str]:
    n = median_words(_answers(task, user.history))
    return {q.id: " ".join(task.retrieval_query(q.input).split()[:n]) for q in user.queries}


def nearest_history(task: Any, user: UserData) -> dict[str, str]:
    if not user.history:
        return {q.id: "" for q in user.queries}
    store = InMemoryHistoryStore(task.item_text)
    store.add(user.history)
    bm25 = BM25Retriever(task.item_text)
    out = {}
    for q in user.queries:
        best = bm25.retrieve(store, task.retrieval_query(q.input), 1)
        out[q.id] = task.item_to_example(best[0])[1]
    return out


def personal_baselines(task: Any, users: Sequence[UserData],
                       base_users: Sequence[UserData] = ()) -> dict[str, dict[str, str]]:
    """{baseline name: {query id: prediction}} for every query of `users`.

    A baseline that cannot be formed for this task (no labelled history anywhere) is left out.
    A user with no usable history gets the global majority as their personal majority/mode/mean.
    """
    out: dict[str, dict[str, str]] = {}
    if task.kind in ("classification", "regression"):
        fallback = global_majority(task, base_users, users)
        answers = {u.user_id: _answers(task, u.history) for u in users}
        if task.kind == "regression":
            means = {}
            for u in users:
                values = [float(a) for a in answers[u.user_id]]
                mean = sum(values) / len(values) if values else (float(fallback) if fallback else None)
                if mean is not None:
                    means.update({q.id: repr(mean) for q in u.queries})
            out[USER_MEAN] = means
        if any(answers.values()):
            personal = {}
            for u in users:
                own = most_frequent(answers[u.user_id]) or fallback
                if own is not None:
                    personal.update({q.id: own for q in u.queries})
            out[USER_MAJORITY if task.kind == "classification" else USER_MODE] = personal
        if fallback is not None:
            out[GLOBAL_MAJORITY] = {q.id: fallback for u in users for q in u.queries}
    elif task.kind == "generation":
        out[QUERY_PREFIX] = {k: v for u in users for k, v in query_prefix(task, u).items()}
        out[NEAREST_HISTORY] = {k: v for u in users for k, v in nearest_history(task, u).items()}
    n_queries = sum(len(u.queries) for u in users)
    # A baseline that some user could not answer (no fallback) would not be paired with the LLM
    # methods on the same queries; leave it out rather than compare it on fewer.
    return {name: preds for name, preds in out.items() if len(preds) == n_queries}
