"""Pick the users an experiment runs on: real data when present, else the synthetic task; which
users (data.select) and which part of their history (data.history_topics: behaviour shift)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..config import DataSpec
from ..records import HistoryItem, TaskDataset, UserData
from .amazon import build_amazon, default_data_root
from .lamp import load_lamp_dataset
from .selection import activity_levels, choose_users
from .synthetic import make_synthetic

log = logging.getLogger(__name__)

REAL_TASKS = ("amazon-rating", "amazon-title")
SYNTHETIC_TASKS = ("synthetic-tag", "synthetic-rating")
# The synthetic stand-in when a real task's files are absent: same kind of answer.
SYNTHETIC_FALLBACK = {"amazon-rating": "synthetic-rating", "amazon-title": "synthetic-tag"}


def _trim(users: list[UserData], max_history: int, n_queries: int) -> list[UserData]:
    """Keep each user's most recent history (the paper's cut) and the first n queries."""
    return [
        UserData(u.user_id, u.history[-max_history:], u.queries[:n_queries], u.profile_text) for u in users
    ]


def load_dataset(spec: DataSpec) -> TaskDataset:
    task, source = spec.task, spec.source
    if source not in ("auto", "real", "synthetic") and Path(source).is_dir():
        ds = load_lamp_dataset(Path(source), task)
    elif task in REAL_TASKS and source in ("auto", "real"):
        root = Path(spec.data_dir) if spec.data_dir else default_data_root()
        try:
            ds = build_amazon(
                task, data_root=root, n_eval_users=spec.users, n_base_users=spec.base_users,
                n_queries=spec.queries, min_history=spec.min_history, select=spec.select,
                max_words=spec.max_words, seed=spec.seed,
            )
        except FileNotFoundError as e:
            if source == "real":
                raise
            fallback = SYNTHETIC_FALLBACK[task]
            log.warning("%s; falling back to the synthetic task %s", e, fallback)
            ds = _synthetic(fallback, spec)
            ds.notes.append(f"real data for {task} not found under {root}; ran the synthetic task {fallback}")
    elif task in SYNTHETIC_TASKS or source == "synthetic":
        name = task if task in SYNTHETIC_TASKS else SYNTHETIC_FALLBACK.get(task, "synthetic-tag")
        ds = _synthetic(name, spec)
    else:
        raise ValueError(
            f"data.task={task!r} with data.source={source!r}: real LaMP tasks need data.source set to a "
            f"directory holding LaMP files; built-in tasks: {', '.join(REAL_TASKS + SYNTHETIC_TASKS)}"
        )
    ds.eval_users = ds.eval_users[: spec.users]
    if spec.history_topics != "all":
        ds.eval_users = [topic_split(u, spec.history_topics) for u in ds.eval_users]
        ds.notes.append(f"history_topics={spec.history_topics}: each evaluated user keeps the half of their history "
                        f"whose words are {'most' if spec.history_topics == 'similar' else 'least'} like their queries'")
    ds.eval_users = _trim(ds.eval_users, spec.max_history, spec.queries)
    ds.base_users = _trim(ds.base_users, spec.max_history, spec.queries)
    return ds


_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) > 2}


def topic_split(user: UserData, which: str) -> UserData:
    """The half of `user`'s history most ("similar") or least ("shifted") like their queries.

    Similarity is the share of an item's words (3+ letters) that occur in any of the user's
    queries; chronological order is kept, so retrieval still sees only earlier items.
    """
    query_words = set().union(*(_words(q.input) for q in user.queries)) if user.queries else set()

    def overlap(item: HistoryItem) -> float:
        w = _words(" ".join(str(v) for v in item.fields.values()))
        return len(w & query_words) / len(w) if w else 0.0

    ranked = sorted(range(len(user.history)), key=lambda i: (overlap(user.history[i]), i),
                    reverse=(which == "similar"))
    keep = sorted(ranked[: (len(user.history) + 1) // 2])
    return UserData(user.user_id, [user.history[i] for i in keep], user.queries, user.profile_text)


def _synthetic(task: str, spec: DataSpec) -> TaskDataset:
    hist = (max(spec.min_history, 4), max(spec.min_history, spec.max_history))
    # Activity selection draws from a larger pool so each level has users to choose from.
    pool = spec.users * 3 if spec.select == "activity" else spec.users
    ds = make_synthetic(
        task, n_base_users=spec.base_users, n_eval_users=pool, history_size=hist,
        n_queries=spec.queries, seed=spec.seed,
    )
    sizes = {u.user_id: len(u.history) for u in ds.eval_users}
    levels = activity_levels(sizes)
    if spec.select != "most-history" or pool != spec.users:
        keep = choose_users(sizes, spec.users, spec.select, spec.seed)
        by_id = {u.user_id: u for u in ds.eval_users}
        ds.eval_users = [by_id[k] for k in keep]
    ds.levels = {u.user_id: levels[u.user_id] for u in ds.eval_users}
    return ds
