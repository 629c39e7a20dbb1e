"""THE DP-FedAvg round (McMahan et al., "Learning Differentially Private Recurrent Language
Models", ICLR 2018): who takes part, how updates are bounded, averaged and noised, and what the
round costs in privacy. The coordinator's Flower path (coordinator/strategy.py `aggregate_dp`),
its SecAgg+ path (coordinator/run.py `_train_secure`, which only sees the sum) and
`oppu ablate privacy` (simulations/ablation.py `run_cell`) all call the functions below, so the
mechanism the ablation measures is the one the coordinator runs.

The mechanism, for one round over N connected users:

1. **Poisson participation** (`participants`): each user is included independently with
   probability q. The draw comes from the operating system's CSPRNG (`secrets.SystemRandom`)
   unless a seed is given (`federation.sampling_seed`, for reproducible simulations: the
   accounting then assumes the seed is secret). Amplification by subsampling needs exactly
   this: a random sample that the adversary does not know, each user in it independently.
2. **Server-side clipping** (`clip`): every update delta = new - global is scaled to L2 norm at
   most C, whatever the client did (a client may clip too; that does not weaken anything).
3. **Fixed denominator**: the sum of the clipped deltas is divided by q·N, the *expected*
   number of participants, not by how many replied. Whether a user replies depends on that user,
   so a data-dependent denominator would change the sensitivity; with q·N, adding or removing
   one user moves the average by at most C/(q·N) whoever else replied (a user who drops out
   contributes a zero delta, which is within the bound).
4. **Gaussian noise** of std z·C/(q·N) on every coordinate, i.e. noise multiplier z relative
   to the sensitivity. The noise generator is seeded from 128 bits of `secrets` unless a seed is
   given (the same `federation.sampling_seed`).
5. **Accounting**: the round is one step of the Poisson-subsampled Gaussian mechanism with
   (z, q) (`RoundResult.event`), whoever replied; shared/privacy.py composes the steps.

A DP round is therefore released and accounted whatever the sample turned out to be (an empty
sample releases the noise alone): skipping rounds depending on the sample would make the
release depend on who was sampled. N, the number of users connected when the round starts, is
treated as public, as the population size is in DP-FedAvg.

Without DP (`robust_weights`, `clip`): each update is clipped to `federation.max_update_norm`
and example counts are capped at `federation.max_weight_ratio` times the round's lower-median
count, so one client can neither move the global adapter further than the bound nor take over the
weighted average by claiming a huge example count.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .privacy import PrivacyEvent

# Independent streams of one seed: participation and noise never share draws.
_SAMPLING, _NOISE = 1, 2


# --------------------------------------------------------------------------------- participation


def participants(count: int, *, sample_rate: float, seed: int | None = None, rnd: int = 0) -> list[int]:
    """Indices in range(count) that take part: each independently with probability `sample_rate`.
    `seed` None: the OS's CSPRNG (the deployment default); else a generator seeded by (seed, rnd)."""
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate!r} must be in [0, 1]")
    if seed is None:
        draw = secrets.SystemRandom()
        return [i for i in range(count) if draw.random() < sample_rate]
    u = np.random.default_rng([int(seed), int(rnd), _SAMPLING]).random(count)
    return [i for i in range(count) if u[i] < sample_rate]


def noise_generator(seed: int | None = None, rnd: int = 0) -> np.random.Generator:
    """The round's noise source: 128 bits from `secrets`, or (seed, rnd) for a reproducible run."""
    return np.random.default_rng(secrets.randbits(128) if seed is None else [int(seed), int(rnd), _NOISE])


# --------------------------------------------------------------------------------- bounding


def _f64(v: Any) -> np.ndarray:
    return np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float64)


def delta_of(new: Mapping[str, Any], old: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """new - old (float64); the keys must match."""
    if set(new) != set(old):
        raise ValueError("the update and the global adapter hold different keys")
    return {k: _f64(new[k]) - _f64(old[k]) for k in old}


def norm(tensors: Mapping[str, Any]) -> float:
    """Global L2 norm over a dict of arrays (as if flattened into one vector)."""
    return math.sqrt(sum(float(np.sum(_f64(v) ** 2)) for v in tensors.values()))


def clip(delta: Mapping[str, np.ndarray], *, bound: float) -> tuple[dict[str, np.ndarray], float]:
    """`delta` scaled to L2 norm <= bound (bound <= 0: unchanged); returns (clipped, norm before)."""
    n = norm(delta)
    scale = min(1.0, bound / n) if bound > 0 and n > 0 else 1.0
    return {k: _f64(v) * scale for k, v in delta.items()}, n


def bounded(update: Mapping[str, Any], global_state: Mapping[str, Any], *,
            bound: float) -> tuple[dict[str, np.ndarray], float]:
    """global + (update - global) clipped to `bound`, in the update's dtype; and the norm before."""
    d, n = clip(delta_of(update, global_state), bound=bound)
    return {k: (_f64(global_state[k]) + d[k]).astype(np.asarray(update[k]).dtype) for k in global_state}, n


def robust_weights(counts: Sequence[float], *, max_ratio: float) -> list[float]:
    """Example counts capped at `max_ratio` x the lower median of the round's counts (a single
    client, or any minority, cannot move the lower median); `max_ratio` <= 0: all weigh the same."""
    counts = [float(c) for c in counts]
    if not counts:
        return []
    if max_ratio <= 0:
        return [1.0] * len(counts)
    cap = max_ratio * sorted(counts)[(len(counts) - 1) // 2]
    return [min(c, cap) for c in counts]


# --------------------------------------------------------------------------------- the DP round


@dataclass(frozen=True)
class Mechanism:
    """One round's DP-FedAvg parameters: noise multiplier z, clipping norm C, participation q."""

    noise_multiplier: float
    clipping_norm: float
    sample_rate: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier={self.noise_multiplier!r} must be a finite number >= 0")
        if not (self.clipping_norm > 0 and math.isfinite(self.clipping_norm)):
            raise ValueError(f"clipping_norm={self.clipping_norm!r} must be a finite number > 0")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate={self.sample_rate!r} must be in (0, 1]")

    def denominator(self, population: int) -> float:
        """q·N: the expected number of participants, fixed before anyone replies."""
        if population <= 0:
            raise ValueError(f"population={population!r} must be > 0")
        return self.sample_rate * population

    def noise_std(self, population: int) -> float:
        """Per-coordinate std of the noise on the average: z·C/(q·N)."""
        return self.noise_multiplier * self.clipping_norm / self.denominator(population)


@dataclass
class RoundResult:
    state: dict[str, np.ndarray]  # the new global tensors (float32), same keys as the global ones
    event: PrivacyEvent | None  # what the accountant composes; None without noise (epsilon infinite)
    contributions: int = 0  # updates in the sum
    norms: list[float] = field(default_factory=list)  # each update's norm before clipping
    clipped: int = 0  # how many were scaled down
    noise_std: float = 0.0


def clipped_sum(global_state: Mapping[str, Any], updates: Sequence[Mapping[str, Any]], *,
                clipping_norm: float) -> tuple[dict[str, np.ndarray], list[float]]:
    """Sum over updates of (update - global) clipped to `clipping_norm`; and each norm before."""
    total = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in global_state.items()}
    norms = []
    for u in updates:
        d, n = clip(delta_of(u, global_state), bound=clipping_norm)
        norms.append(n)
        for k in total:
            total[k] += d[k]
    return total, norms


def release(global_state: Mapping[str, Any], delta_sum: Mapping[str, np.ndarray], *, mechanism: Mechanism,
            population: int, rng: np.random.Generator, contributions: int = 0,
            norms: Sequence[float] = ()) -> RoundResult:
    """global + delta_sum / (q·N) + N(0, (z·C/(q·N))²) per coordinate. `delta_sum` must already be a
    sum of deltas each of norm <= C (clipped_sum; under SecAgg+ each client clips its own)."""
    denom = mechanism.denominator(population)
    std = mechanism.noise_std(population)
    out = {}
    for k in sorted(global_state):  # a fixed order of noise draws, whatever order the dict has
        v = _f64(global_state[k]) + np.asarray(delta_sum[k], dtype=np.float64) / denom
        if std > 0:
            v = v + rng.normal(0.0, std, size=v.shape)
        out[k] = v.astype(np.float32)
    event = PrivacyEvent(mechanism.noise_multiplier, mechanism.sample_rate, 1) if mechanism.noise_multiplier > 0 else None
    c = mechanism.clipping_norm
    return RoundResult({k: out[k] for k in global_state}, event, contributions, list(norms),
                       sum(1 for n in norms if n > c), std)


def dp_fedavg_round(global_state: Mapping[str, Any], updates: Sequence[Mapping[str, Any]], *,
                    mechanism: Mechanism, population: int, rng: np.random.Generator) -> RoundResult:
    """One DP-FedAvg round over the updates of this round's participants (new tensors, same keys
    as `global_state`): clip each to C, sum, divide by q·N, add the noise. Account `event`."""
    total, norms = clipped_sum(global_state, updates, clipping_norm=mechanism.clipping_norm)
    return release(global_state, total, mechanism=mechanism, population=population, rng=rng,
                   contributions=len(updates), norms=norms)
