"""Pick the users an experiment runs on: real data when present, else the synthetic task."""

from __future__ import annotations

import logging
from pathlib import Path

from shared.config import DataSpec
from shared.records import TaskDataset, UserData

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
    from shared.data import build_amazon, load_lamp_dataset, make_synthetic
    from shared.data.amazon import default_data_root

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
    ds.eval_users = _trim(ds.eval_users[: spec.users], spec.max_history, spec.queries)
    ds.base_users = _trim(ds.base_users, spec.max_history, spec.queries)
    return ds


def _synthetic(task: str, spec: DataSpec) -> TaskDataset:
    from shared.data import make_synthetic

    hist = (max(spec.min_history, 4), max(spec.min_history, spec.max_history))
    return make_synthetic(
        task, n_base_users=spec.base_users, n_eval_users=spec.users, history_size=hist,
        n_queries=spec.queries, seed=spec.seed,
    )
