"""A seeded synthetic LaMP-style task with planted per-user preferences, for fast tests.

Each user has one planted habit that the content does not reveal:
- synthetic-tag: a favourite tag; they tag ~85% of their movies with it, the rest at random.
  Descriptions come from word lists and only weakly hint at the tag actually given, so a model
  that ignores the user cannot do much better than chance, while one that learns the user can
  approach the oracle.
- synthetic-rating: a personal rating; they give it ~80% of the time, else one star more or less.
  Review texts are neutral, so the text says nothing about the rating.

The oracle knows the generative rule (the user's habit, read off their own history) and ignores
content; `oracle_scores` reports it next to a constant baseline, which is the gap
personalization can close. Texts are short because a 135M model trains on them on a CPU.
Deterministic given the seed: one random.Random(seed) drives everything, never global state.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

from ..records import HistoryItem, Query, TaskDataset, UserData
from ..tasks import SYNTHETIC_TAGS, get_task

SYNTHETIC_TASKS = ("synthetic-tag", "synthetic-rating")
P_FAVOURITE_TAG = 0.85
P_CUE_MATCHES_TAG = 0.3  # how often a description's one genre word matches the tag given
P_USUAL_RATING = 0.8

_PEOPLE = ["a retired teacher", "two brothers", "a young nurse", "an old sailor", "a quiet clerk",
           "a street musician", "a farmer's daughter", "a night-shift cook", "a travelling salesman",
           "a widowed baker", "a chess player", "three school friends", "a stubborn mayor", "a taxi driver"]
_PLACES = ["a small coastal town", "a crowded city", "an island village", "a mountain hotel", "a border town",
           "a northern harbour", "an empty factory", "a family farm", "a busy train station", "a rainy suburb"]
_EVENTS = ["a letter arrives", "the river floods", "an old friend returns", "the shop closes",
           "a stranger moves in", "the power goes out", "a wedding is cancelled", "a storm hits",
           "a secret is found", "the festival begins"]
_ENDINGS = ["everything slowly changes", "old plans fall apart", "the whole town takes notice",
            "nobody is quite the same", "a long journey begins", "choices must be made"]
# One word per tag that *hints* at it; a description carries one hint, usually of another tag.
_CUES = {"comedy": "funny", "romance": "tender", "action": "fast-paced", "fantasy": "magical",
         "sci-fi": "futuristic", "classic": "timeless"}

_PRODUCTS = ["guitar strap", "tuner", "capo", "cable", "pedal", "set of strings", "stand", "pick pack",
             "microphone clip", "gig bag", "pop filter", "metronome"]
_USES = ["at home", "at rehearsal", "on stage", "in the studio", "for practice", "at lessons"]
_SPANS = ["a week", "two weeks", "a month", "a few days", "several months"]
_REMARKS = ["It does what the listing says.", "The colour is as pictured.", "It came in a plain box.",
            "Setup took a few minutes.", "It fits in my case.", "I have not compared it to others."]


def _description(rng: random.Random, tag: str) -> str:
    cue_tag = tag if rng.random() < P_CUE_MATCHES_TAG else rng.choice(SYNTHETIC_TAGS)
    return (f"In {rng.choice(_PLACES)}, {rng.choice(_PEOPLE)} finds life upended when {rng.choice(_EVENTS)}, "
            f"and {rng.choice(_ENDINGS)} in this {_CUES[cue_tag]} film.")


def _review(rng: random.Random) -> str:
    return (f"I bought this {rng.choice(_PRODUCTS)} and used it {rng.choice(_USES)} for "
            f"{rng.choice(_SPANS)}. {rng.choice(_REMARKS)}")


def _tag_items(rng: random.Random, favourite: str, n: int) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        tag = favourite if rng.random() < P_FAVOURITE_TAG else rng.choice([t for t in SYNTHETIC_TAGS if t != favourite])
        out.append({"description": _description(rng, tag), "tag": tag})
    return out


def _rating_items(rng: random.Random, usual: int, n: int) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        score = usual
        if rng.random() >= P_USUAL_RATING:
            score = rng.choice([s for s in (usual - 1, usual + 1) if 1 <= s <= 5])
        out.append({"text": _review(rng), "score": str(score)})
    return out


def _history_size(rng: random.Random, history_size: int | Sequence[int]) -> int:
    if isinstance(history_size, int):
        lo = hi = history_size
    else:
        lo, hi = history_size
    if lo < 1 or hi < lo:
        raise ValueError(f"shared/data/synthetic.py: history_size={history_size!r} must be >= 1 or (min, max) with 1 <= min <= max")
    return rng.randint(lo, hi)


def _make_user(task_name: str, rng: random.Random, uid: str, n_history: int, n_queries: int) -> UserData:
    task = get_task(task_name)
    n = n_history + n_queries
    if task_name == "synthetic-tag":
        raw = _tag_items(rng, rng.choice(SYNTHETIC_TAGS), n)
    else:
        raw = _rating_items(rng, rng.randint(1, 5), n)
    items = [HistoryItem(f"{uid}-{j:03d}", fields, time=j + 1) for j, fields in enumerate(raw)]
    history = items[:n_history]
    queries = [Query(f"{uid}-q{j}", task.make_input(it), task.item_target(it)) for j, it in enumerate(items[n_history:])]
    return UserData(uid, history, queries)


def make_synthetic(
    task: str = "synthetic-tag",
    n_base_users: int = 20,
    n_eval_users: int = 4,
    history_size: int | Sequence[int] = (8, 16),
    n_queries: int = 4,
    seed: int = 0,
) -> TaskDataset:
    """A synthetic task in LaMP form; base and eval users are disjoint, queries come after history."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"shared/data/synthetic.py: task={task!r} is not synthetic; choose from {', '.join(SYNTHETIC_TASKS)}")
    for name, value in (("n_base_users", n_base_users), ("n_eval_users", n_eval_users), ("n_queries", n_queries)):
        if value < 0:
            raise ValueError(f"shared/data/synthetic.py: {name}={value} must be >= 0")
    rng = random.Random(seed)
    short = task.split("-")[1]
    users = [
        _make_user(task, rng, f"syn-{short}-s{seed}-u{i:04d}", _history_size(rng, history_size), n_queries)
        for i in range(n_base_users + n_eval_users)
    ]
    ds = TaskDataset(task, users[n_eval_users:], users[:n_eval_users], f"synthetic(task={task}, seed={seed})")
    if n_eval_users and n_queries:
        oracle, constant = oracle_scores(ds)
        ds.notes.append(f"oracle (the user's habit) scores {_fmt(oracle)}; constant baseline scores {_fmt(constant)}")
    return ds


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in scores.items())


def _habit(user: UserData, field: str) -> str:
    """The user's most frequent value of `field` in their history (first seen wins a tie)."""
    counts = Counter(item.get(field) for item in user.history)
    return counts.most_common(1)[0][0]


def oracle_predict(user: UserData) -> list[str]:
    """The planted habit as every query's answer: the favourite tag, or the usual rating.

    Read off the user's own history: with ~85% (~80%) of items carrying the habit, the history's
    mode is the planted value for all but tiny histories, and it is the best answer a method that
    ignores content (which carries no rating and only a weak tag signal) can give.
    """
    if not user.history:
        raise ValueError(f"shared/data/synthetic.py: user {user.user_id!r} has no history to read a habit from")
    field = "tag" if "tag" in user.history[0].fields else "score"
    return [_habit(user, field)] * len(user.queries)


def oracle_scores(ds: TaskDataset) -> tuple[dict[str, float], dict[str, float]]:
    """(oracle, constant baseline) scores on the eval users. The constant baseline answers every
    query with the base users' most common answer, the best a non-personalized, content-blind
    model can learn from base data (the eval golds' own mode when there are no base users)."""
    task = get_task(ds.task)
    golds = [q.target or "" for u in ds.eval_users for q in u.queries]
    preds = [p for u in ds.eval_users for p in oracle_predict(u)]
    pool = [q.target for u in ds.base_users for q in u.queries if q.target] or golds
    constant = Counter(pool).most_common(1)[0][0]
    return task.score(preds, golds), task.score([constant] * len(golds), golds)
