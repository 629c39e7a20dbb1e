"""Empirical privacy: a loss-threshold membership-inference attack (Yeom et al., CSF 2018).

The attacker sees an adapter and a record and guesses "member" when the model's loss on the
record is low. Over all thresholds, its success is the ROC AUC of the score -loss for members
(records the adapter was trained on) against non-members (records of the same distribution it
never saw): 0.5 is chance, 1.0 separates them perfectly. The AUC is the Mann-Whitney statistic:
the probability that a random member scores above a random non-member, ties counting one half.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

import numpy as np


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative) + 0.5 · P(tie)."""
    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"AUC needs both classes; got {pos.size} members and {neg.size} non-members")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("AUC: scores must be finite numbers")
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=float)
    ranks[order] = np.arange(1, len(scores) + 1)
    # Tied scores share their average rank, which counts each tie as one half.
    sorted_scores = scores[order]
    start = 0
    for end in range(1, len(scores) + 1):
        if end == len(scores) or sorted_scores[end] != sorted_scores[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2.0
            start = end
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def loss_attack_auc(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> float:
    """AUC of the loss-threshold attack: lower loss means "member"."""
    return auc([-x for x in member_losses], [-x for x in nonmember_losses])


def balanced(members: Sequence[Any], nonmembers: Sequence[Any], limit: int, seed: int) -> tuple[list[Any], list[Any]]:
    """Equally many members and non-members (at most `limit` each), seeded."""
    n = min(len(members), len(nonmembers), limit)
    rng = random.Random(seed)
    return rng.sample(list(members), n), rng.sample(list(nonmembers), n)


def attack(engine: Any, members: Sequence[Any], nonmembers: Sequence[Any], *, personal: bool,
           max_length: int = 512) -> dict[str, Any]:
    """Losses of `members` and `nonmembers` (shared.training.Example) under the engine's base
    adapter (+ personal when `personal`), and the attack's AUC."""
    m = engine.example_losses(members, personal=personal, max_length=max_length)
    n = engine.example_losses(nonmembers, personal=personal, max_length=max_length)
    return {"auc": loss_attack_auc(m, n), "members": len(m), "nonmembers": len(n),
            "member_loss": float(np.mean(m)), "nonmember_loss": float(np.mean(n)),
            "member_losses": [float(x) for x in m], "nonmember_losses": [float(x) for x in n]}


def calibrated_auc(after: Mapping[str, Any], before: Mapping[str, Any]) -> float:
    """AUC of the calibrated attack (Watson et al., ICLR 2022): the score of a record is how much
    its loss fell from a reference model to the target model. Here the reference is the base
    adapter before any round, which every client received, so the attacker holds it too. It
    cancels what a record's own difficulty gives away: where the adapter did not move, every
    score is 0 and the AUC is exactly 0.5."""
    m = [b - a for a, b in zip(after["member_losses"], before["member_losses"])]
    n = [b - a for a, b in zip(after["nonmember_losses"], before["nonmember_losses"])]
    return auc(m, n)
