"""Differential privacy accounting: the Poisson-subsampled Gaussian mechanism composed over
rounds, with state that survives save/load.

User-level DP-FedAvg (McMahan et al., ICLR 2018) on the base adapter: each round includes every
connected user independently with probability q, clips each update to L2 norm C on the server,
divides the sum by the fixed q·N and adds N(0, (z·C/(q·N))²) per coordinate
(shared/aggregation.py). One round is one step of the Poisson-subsampled Gaussian mechanism
with noise multiplier z and sampling rate q, whoever replied.

Two analyses of the same events, both upper bounds on epsilon at a given delta:

- **RDP** (Rényi DP, Mironov et al. 2019), Opacus's maths (`rdp_sampled_gaussian`); it equals
  Google's dp-accounting RDP accountant to the third decimal.
- **PRV** (numerical composition of privacy loss random variables, Gopi et al., NeurIPS 2021),
  Opacus's `PRVAccountant`, taking the upper end of its error interval, so the result stays an
  upper bound. It is tighter than RDP on the same events (e.g. z=0.8, q=1/3, 2 rounds,
  delta=1e-3: 3.48 against 4.26), because the RDP-to-(epsilon, delta) conversion is lossy.
  Google's dp-accounting PLD accountant, an independent implementation of the same idea, gives
  3.47 there; tests/coordinator/test_privacy_accounting.py checks both analyses against
  dp-accounting (RDP and PLD) and Opacus for a grid of (z, q, steps, delta).

`Accountant.epsilon` reports the smaller of the two (each is a valid upper bound, so the smaller
one is too), and the budget stop uses that same number; `epsilon_rdp`/`epsilon_prv` give each.
Where RDP's epsilon exceeds PRV_MAX_EPSILON (64) the PRV analysis is skipped (reported as None):
its discretization grows with the range of the privacy loss and runs out of memory for tiny noise
(z = 0.003), and at such epsilons the difference does not matter.
`RDPAccountant` (RDP only) serves record-level DP-SGD ledgers (shared/dpsgd.py).

Maths (pure functions) is kept apart from state, as in Opacus' `accountants/`; every privacy
parameter is keyword-only so a noise multiplier is never passed as a sampling rate.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

# Orders (alphas) searched for the tightest (epsilon, delta) conversion: Opacus's defaults plus a
# few large ones, which matter for small epsilons.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)] + [128.0, 256.0, 512.0]
)

# Accuracy asked of the PRV accountant; its upper bound is at most this far above its estimate.
PRV_EPS_ERROR = 0.01
# The PRV analysis runs only where RDP's epsilon is at most this (see Accountant.report).
PRV_MAX_EPSILON = 64.0

# --------------------------------------------------------------------------------------- maths


def rdp_sampled_gaussian(
    *, noise_multiplier: float, sample_rate: float, steps: int, orders: Sequence[float] = DEFAULT_ORDERS
) -> np.ndarray:
    """RDP at each order of `steps` compositions of the sampled Gaussian mechanism."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    _check_event(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    if steps == 0 or sample_rate == 0:
        return np.zeros(len(orders))
    if noise_multiplier == 0:
        return np.full(len(orders), np.inf)
    return np.asarray(
        rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=list(orders)),
        dtype=float,
    )


def epsilon_from_rdp(*, rdp: np.ndarray, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> tuple[float, float]:
    """(epsilon, best order) for a total RDP curve at target `delta`."""
    import warnings

    from opacus.accountants.analysis import rdp as rdp_analysis

    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} must be in (0, 1)")
    rdp = np.asarray(rdp, dtype=float)
    if not np.isfinite(rdp).any():
        return math.inf, math.nan
    if not rdp.any():
        return 0.0, math.nan
    with warnings.catch_warnings():  # "optimal order is the largest alpha" is informational here
        warnings.simplefilter("ignore")
        eps, order = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=list(rdp), delta=delta)
    return float(eps), float(order)


def prv_epsilon(*, events: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at `delta` of the composition of (noise_multiplier, sample_rate, steps) events of the
    Poisson-subsampled Gaussian mechanism by numerical composition of privacy loss random
    variables (Gopi et al., NeurIPS 2021; Opacus's `PRVAccountant`): the upper end of its error
    interval (eps_error 0.01), so an upper bound. inf where the analysis cannot give one (then
    the RDP figure stands)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} must be in (0, 1)")
    key = tuple((float(z), float(q), int(n)) for z, q, n in events)
    for z, q, n in key:
        _check_event(noise_multiplier=z, sample_rate=q, steps=n)
    return _prv_epsilon(key, float(delta))


@functools.lru_cache(maxsize=256)
def _prv_epsilon(events: tuple[tuple[float, float, int], ...], delta: float) -> float:
    import warnings

    from opacus.accountants import PRVAccountant

    live = [(z, q, n) for z, q, n in events if n > 0 and q > 0]
    if not live:
        return 0.0
    if any(z == 0 for z, _, _ in live):
        return math.inf
    acc = PRVAccountant()
    acc.history = list(live)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            eps = float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
    except (ValueError, ArithmeticError, RuntimeError):  # a domain the discretization cannot cover
        return math.inf
    return max(0.0, eps) if math.isfinite(eps) else math.inf


def l2_norm(tensors: Mapping[str, Any]) -> float:
    """Global L2 norm over a dict of arrays/tensors (as if flattened into one vector)."""
    from .aggregation import norm  # here, not at the top: shared.aggregation imports this module

    return norm(tensors)


def clip_update(
    new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray], *, clipping_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """old + (new - old) scaled to L2 norm <= clipping_norm; returns (clipped new, norm before).
    The clipping rule itself is shared/aggregation.py's (one place for it)."""
    from .aggregation import bounded  # here, not at the top: shared.aggregation imports this module

    return bounded(new, old, bound=clipping_norm)


def _check_event(*, noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate!r} must be in [0, 1]")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps={steps!r} must be a whole number >= 0")


# --------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class PrivacyEvent:
    """`steps` compositions of the sampled Gaussian mechanism with one (z, q)."""

    noise_multiplier: float
    sample_rate: float
    steps: int = 1


class RDPAccountant:
    """Composes sampled-Gaussian events and converts to (epsilon, delta).

    The state is the list of events; `state_dict()` is JSON-serializable and
    `load_state_dict()` restores it exactly, so a restarted coordinator reports the same epsilon.
    """

    def __init__(self, *, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        self.orders = tuple(float(o) for o in orders)
        self.history: list[PrivacyEvent] = []

    # -- composing ---------------------------------------------------------------------------

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        _check_event(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        last = self.history[-1] if self.history else None
        if last and last.noise_multiplier == noise_multiplier and last.sample_rate == sample_rate:
            self.history[-1] = PrivacyEvent(noise_multiplier, sample_rate, last.steps + steps)
        else:
            self.history.append(PrivacyEvent(float(noise_multiplier), float(sample_rate), int(steps)))

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.history)

    def _rdp(self, events: Sequence[PrivacyEvent]) -> np.ndarray:
        total = np.zeros(len(self.orders))
        for e in events:
            total = total + rdp_sampled_gaussian(
                noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps, orders=self.orders
            )
        return total

    # -- reporting ---------------------------------------------------------------------------

    def epsilon(self, *, delta: float) -> float:
        return epsilon_from_rdp(rdp=self._rdp(self.history), delta=delta, orders=self.orders)[0]

    def epsilon_after(self, *, delta: float, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """Epsilon if one more event were composed (the accountant is not changed)."""
        _check_event(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        extra = PrivacyEvent(noise_multiplier, sample_rate, steps)
        return epsilon_from_rdp(rdp=self._rdp([*self.history, extra]), delta=delta, orders=self.orders)[0]

    def would_exceed(
        self, *, budget: float, delta: float, noise_multiplier: float, sample_rate: float, steps: int = 1
    ) -> bool:
        """True when composing the event would take epsilon past `budget` (0 = no budget)."""
        if budget <= 0:
            return False
        return self.epsilon_after(
            delta=delta, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        ) > budget

    # -- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "mechanism": "sampled-gaussian/rdp",
            "orders": list(self.orders),
            "history": [[e.noise_multiplier, e.sample_rate, e.steps] for e in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("mechanism") != "sampled-gaussian/rdp":
            raise ValueError(f"accountant state is for {state.get('mechanism')!r}, not sampled-gaussian/rdp")
        orders = tuple(float(o) for o in state["orders"])
        history = []
        for item in state["history"]:
            z, q, n = float(item[0]), float(item[1]), int(item[2])
            _check_event(noise_multiplier=z, sample_rate=q, steps=n)
            history.append(PrivacyEvent(z, q, n))
        self.orders, self.history = orders, history

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RDPAccountant:
        acc = cls()
        acc.load_state_dict(state)
        return acc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RDPAccountant) and other.state_dict() == self.state_dict()

    def __repr__(self) -> str:
        return f"RDPAccountant(steps={self.steps}, events={len(self.history)})"


class Accountant(RDPAccountant):
    """The user-level ledger of a federated run: the same events, reported with the tightest
    correct epsilon (the smaller of the RDP and PRV upper bounds). `epsilon`, `epsilon_after`
    and `would_exceed` (the budget stop) all use that number; the state is RDPAccountant's."""

    def epsilon_rdp(self, *, delta: float) -> float:
        return super().epsilon(delta=delta)

    def epsilon_prv(self, *, delta: float) -> float:
        return prv_epsilon(events=[(e.noise_multiplier, e.sample_rate, e.steps) for e in self.history], delta=delta)

    def epsilon(self, *, delta: float) -> float:
        return self.report(delta=delta)["epsilon"]

    def epsilon_after(self, *, delta: float, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        future = Accountant(orders=self.orders)
        future.history = list(self.history)
        future.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return future.epsilon(delta=delta)

    def report(self, *, delta: float) -> dict[str, float]:
        """What a run reports: epsilon (the smaller), and each analysis's figure (epsilon_prv None
        where the PRV analysis did not run or could not bound it)."""
        rdp = self.epsilon_rdp(delta=delta)
        # Above PRV_MAX_EPSILON the tighter figure changes nothing that matters, and the PRV
        # discretization grows with the privacy loss's range (z = 0.003 exhausts memory): RDP stands.
        prv = self.epsilon_prv(delta=delta) if rdp <= PRV_MAX_EPSILON else math.inf
        return {"epsilon": min(rdp, prv), "epsilon_rdp": rdp,
                "epsilon_prv": prv if math.isfinite(prv) else None, "delta": delta}

    def __repr__(self) -> str:
        return f"Accountant(steps={self.steps}, events={len(self.history)})"
