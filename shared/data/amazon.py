"""Build the real-data tasks "amazon-rating" and "amazon-title" from Amazon reviews.

Source: reviews_Musical_Instruments_5.json.gz (McAuley et al., 5-core; see
../shared/data/README.md), read in place; nothing is copied or cached on disk.

Per reviewer, reviews are ordered by unixReviewTime: the most recent `n_queries` are queries and
the earlier ones are history. unixReviewTime has day resolution, so a history review written the
same day as the first query could be later than it; such reviews are dropped (counted in notes)
so history is strictly earlier than every query. Users are split by reviewer: evaluated
reviewers never contribute a review to the base users, which train the shared base adapter.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from ..jsonl import json_lines
from ..records import HistoryItem, Query, TaskDataset, UserData
from ..tasks import get_task
from .selection import activity_levels, choose_users

AMAZON_TASKS = ("amazon-rating", "amazon-title")
SELECT_RULES = ("most-history", "random", "activity")
REVIEWS_FILE = Path("amazon-musical-instruments") / "reviews_Musical_Instruments_5.json.gz"
REVIEWS_SHA256 = "03f9cc27ae13a454cb4ea6cb620fb10546cc1194ef921441d1c5f34addff2748"


def default_data_root() -> Path:
    """$OPPU_DATA_DIR, else ../shared/data next to the repository root."""
    env = os.environ.get("OPPU_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def reviews_path(data_root: str | Path | None = None) -> Path:
    return Path(data_root if data_root is not None else default_data_root()) / REVIEWS_FILE


class Review(NamedTuple):
    line: int  # 1-based line in the file, for error messages and a stable tie-break
    reviewer: str
    asin: str
    text: str
    rating: float
    summary: str
    time: int


@lru_cache(maxsize=2)
def _load_reviews(path: str, mtime_ns: int, size: int) -> tuple[Review, ...]:
    # Keyed by mtime and size so an edited file is re-read; in memory only.
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for n, rec in json_lines(fh, path):
            where = f"{path}: line {n}"
            try:
                out.append(Review(n, str(rec["reviewerID"]), str(rec["asin"]), str(rec.get("reviewText") or ""),
                                  float(rec["overall"]), str(rec.get("summary") or ""), int(rec["unixReviewTime"])))
            except KeyError as e:
                raise ValueError(f"{where} (reviewerID {rec.get('reviewerID')!r}): missing field {e.args[0]!r}") from None
            except (TypeError, ValueError):
                raise ValueError(f"{where} (reviewerID {rec.get('reviewerID')!r}): field 'overall' or "
                                 f"'unixReviewTime' is not a number") from None
    return tuple(out)


def read_reviews(path: str | Path, *, verify_sha256: bool = False) -> tuple[Review, ...]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: Amazon reviews file not found; set OPPU_DATA_DIR (or data_root / data.data_dir) to the "
            f"directory that holds {REVIEWS_FILE}"
        )
    if verify_sha256:  # off by default: hashing costs time on every build
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != REVIEWS_SHA256:
            raise ValueError(f"{path}: sha256 {digest} differs from the expected {REVIEWS_SHA256}")
    st = path.stat()
    return _load_reviews(str(path), st.st_mtime_ns, st.st_size)


def _clip(text: str, max_words: int) -> str:
    return " ".join(text.split()[:max_words])


def _split_user(reviews: list[Review], n_queries: int) -> tuple[list[Review], list[Review], int]:
    """(history, queries, dropped): queries are the latest n_queries; history is strictly earlier."""
    ordered = sorted(reviews, key=lambda r: (r.time, r.line))
    queries = ordered[-n_queries:]
    earlier = ordered[:-n_queries]
    history = [r for r in earlier if r.time < queries[0].time]
    return history, queries, len(earlier) - len(history)


def build_amazon(
    task: str,
    data_root: str | Path | None = None,
    n_eval_users: int = 8,
    n_base_users: int | None = 40,
    n_queries: int = 2,
    min_history: int = 8,
    select: str = "most-history",
    max_words: int = 120,
    seed: int = 0,
    *,
    verify_sha256: bool = False,
) -> TaskDataset:
    """The amazon-rating or amazon-title task as a TaskDataset.

    Evaluated reviewers are chosen among those with >= min_history history reviews, by `select`:
    "most-history" (the longest histories; ties by reviewer id), "random" (seeded) or "activity" (equal
    shares of the low/medium/high tertiles of history size; shared/data/selection.py). Base users
    are `n_base_users` of the other reviewers (seeded sample; None = all of them).
    """
    if task not in AMAZON_TASKS:
        raise ValueError(f"shared/data/amazon.py: task={task!r}; choose from {', '.join(AMAZON_TASKS)}")
    if select not in SELECT_RULES:
        raise ValueError(f"shared/data/amazon.py: select={select!r}; choose from {', '.join(SELECT_RULES)}")
    if n_queries < 1 or n_eval_users < 0 or min_history < 0 or max_words < 1:
        raise ValueError(f"shared/data/amazon.py: need n_queries >= 1, n_eval_users >= 0, min_history >= 0, "
                         f"max_words >= 1; got {n_queries}, {n_eval_users}, {min_history}, {max_words}")
    spec = get_task(task)
    path = reviews_path(data_root)
    reviews = read_reviews(path, verify_sha256=verify_sha256)

    def usable(r: Review) -> bool:
        return bool(r.text.strip()) and (task != "amazon-title" or bool(r.summary.strip()))

    by_reviewer: dict[str, list[Review]] = {}
    for r in reviews:
        if usable(r):
            by_reviewer.setdefault(r.reviewer, []).append(r)
    skipped = len(reviews) - sum(len(v) for v in by_reviewer.values())

    splits = {rid: _split_user(rs, n_queries) for rid, rs in sorted(by_reviewer.items()) if len(rs) > n_queries}
    eligible = [rid for rid, (hist, _, _) in splits.items() if len(hist) >= max(min_history, 1)]
    rng = random.Random(seed)
    sizes = {rid: len(splits[rid][0]) for rid in eligible}
    if select == "most-history":
        chosen = sorted(eligible, key=lambda rid: (-len(splits[rid][0]), rid))[:n_eval_users]
    elif select == "random":
        chosen = rng.sample(eligible, min(n_eval_users, len(eligible)))
    else:
        chosen = choose_users(sizes, n_eval_users, "activity", seed)
    levels = activity_levels(sizes)
    chosen_set = set(chosen)
    others = [rid for rid, (hist, _, _) in splits.items() if rid not in chosen_set and hist]
    if n_base_users is not None and n_base_users < len(others):
        others = sorted(rng.sample(others, n_base_users))

    def to_user(rid: str) -> UserData:
        hist, queries, _ = splits[rid]
        items = [_item(spec.name, r, max_words) for r in hist]
        for it in items:
            spec.validate_item(it, f"{path} reviewer {rid!r}")
        qs = []
        for r in queries:
            it = _item(spec.name, r, max_words)
            spec.validate_item(it, f"{path} reviewer {rid!r}")
            qs.append(Query(it.id, spec.make_input(it), spec.item_target(it)))
        return UserData(rid, items, qs)

    eval_users = [to_user(rid) for rid in chosen]
    base_users = [to_user(rid) for rid in others]
    _check_isolation(path, eval_users, base_users)

    dropped = sum(splits[rid][2] for rid in chosen + others)
    notes = [
        f"{skipped} reviews skipped for empty reviewText" + (" or summary" if task == "amazon-title" else ""),
        f"{dropped} history reviews of selected users dropped for sharing a day with their first query",
        f"{len(eligible)} reviewers have >= {min_history} history reviews; {len(eval_users)} evaluated ({select})",
    ]
    if len(eval_users) < n_eval_users:
        notes.append(f"asked for {n_eval_users} evaluated reviewers but only {len(eval_users)} qualify")
    return TaskDataset(task, base_users, eval_users, str(path), notes, {rid: levels[rid] for rid in chosen})


def _item(task: str, r: Review, max_words: int) -> HistoryItem:
    # (reviewer, product) is unique in the 5-core file, so it makes a stable id.
    fields = {"text": _clip(r.text, max_words)}
    if task == "amazon-rating":
        fields["score"] = str(int(r.rating))
    else:
        fields["title"] = r.summary.strip()
    return HistoryItem(f"{r.reviewer}-{r.asin}", fields, time=r.time)


def _check_isolation(path: Path, eval_users: list[UserData], base_users: list[UserData]) -> None:
    """No evaluated reviewer, nor any of their reviews, may reach the base adapter's data.

    An explicit raise rather than `assert`, which `python -O` would strip."""
    eval_ids = {u.user_id for u in eval_users}
    leaked_users = eval_ids & {u.user_id for u in base_users}
    eval_reviews = {x.id for u in eval_users for x in [*u.history, *u.queries]}
    base_reviews = {x.id for u in base_users for x in [*u.history, *u.queries]}
    leaked = eval_reviews & base_reviews
    if leaked_users or leaked:
        raise RuntimeError(f"{path}: evaluated reviewers leak into base users: "
                           f"{sorted(leaked_users)[:3]} / reviews {sorted(leaked)[:3]}")
