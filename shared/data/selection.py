"""Which users a study evaluates: by history size (most first), at random, or by activity level.

Activity levels are the tertiles of history size among the eligible users (low / medium / high),
as in the OPPU paper's study of users with different amounts of history. Selecting by "activity"
draws the same number of users from each level (seeded), so gains can be compared per level.
"""

from __future__ import annotations

import random
from typing import Mapping

LEVELS = ("low", "medium", "high")


def activity_levels(sizes: Mapping[str, int]) -> dict[str, str]:
    """user -> low | medium | high, by the tertiles of `sizes` (history items per user).

    Users are ranked by size (ties by id) and cut at the sizes found at the 1/3 and 2/3 ranks;
    users of equal size always share a level (ties at a cut go to the lower level).
    """
    ranked = sorted(sizes, key=lambda u: (sizes[u], u))
    n = len(ranked)
    out: dict[str, str] = {}
    if not n:
        return out
    low_cut, mid_cut = sizes[ranked[(n - 1) // 3]], sizes[ranked[(2 * n - 1) // 3]]
    for u in ranked:
        s = sizes[u]
        out[u] = "low" if s <= low_cut else "medium" if s <= mid_cut else "high"
    # Degenerate distributions (many equal sizes) may leave a level empty; that is reported, not hidden.
    return out


def choose_users(sizes: Mapping[str, int], n: int, rule: str, seed: int) -> list[str]:
    """`n` user ids among `sizes` by `rule` (most-history | random | activity)."""
    ids = sorted(sizes)
    if rule == "most-history":
        return sorted(ids, key=lambda u: (-sizes[u], u))[:n]
    rng = random.Random(seed)
    if rule == "random":
        return rng.sample(ids, min(n, len(ids)))
    if rule != "activity":
        raise ValueError(f"select={rule!r}; choose from most-history, random, activity")
    levels = activity_levels(sizes)
    pools = {lv: [u for u in ids if levels[u] == lv] for lv in LEVELS}
    for pool in pools.values():
        rng.shuffle(pool)
    chosen: list[str] = []
    # Round-robin over levels, so n=3k gives k per level whenever each level has k users.
    while len(chosen) < min(n, len(ids)):
        for lv in LEVELS:
            if pools[lv] and len(chosen) < n:
                chosen.append(pools[lv].pop())
    return chosen
