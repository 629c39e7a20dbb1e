"""Differential privacy: update clipping, Gaussian noise scale, and an RDP accountant whose state
survives save/load.

User-level DP-FedAvg (McMahan et al., ICLR 2018) on the base adapter: each sampled user's update is
clipped to L2 norm C on the client (Flower's `fixedclipping_mod`), the coordinator averages the m
sampled updates and adds N(0, (z·C/m)²) per coordinate (Flower's
`DifferentialPrivacyClientSideFixedClipping`). One round is then one step of the sampled Gaussian
mechanism with noise multiplier z and sampling rate q = m / N (sampled users / all users), and its
privacy loss composes across rounds in Rényi DP. Flower's wrappers add the noise but account only
without sampling amplification; this module does the accounting with Opacus's RDP analysis
(Mironov et al. 2019), so the maths is Opacus's and the state is ours.

Maths (pure functions) is kept apart from state (`RDPAccountant`), as in Opacus' `accountants/`;
every privacy parameter is keyword-only so a noise multiplier is never passed as a sampling rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

# Orders (alphas) searched for the tightest (epsilon, delta) conversion: Opacus's defaults plus a
# few large ones, which matter for small epsilons.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)] + [128.0, 256.0, 512.0]
)

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


def noise_std(*, noise_multiplier: float, clipping_norm: float, num_clients: int) -> float:
    """Per-coordinate std of the noise on an average of `num_clients` updates clipped to `clipping_norm`."""
    if num_clients <= 0:
        raise ValueError(f"num_clients={num_clients!r} must be > 0")
    return noise_multiplier * clipping_norm / num_clients


def l2_norm(tensors: Mapping[str, Any]) -> float:
    """Global L2 norm over a dict of arrays/tensors (as if flattened into one vector)."""
    total = 0.0
    for v in tensors.values():
        a = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float64)
        total += float(np.sum(a * a))
    return math.sqrt(total)


def clip_update(
    new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray], *, clipping_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """old + (new - old) scaled to L2 norm <= clipping_norm; returns (clipped new, norm before)."""
    if set(new) != set(old):
        raise ValueError("clip_update: the update and the reference hold different keys")
    delta = {k: np.asarray(new[k], dtype=np.float64) - np.asarray(old[k], dtype=np.float64) for k in new}
    norm = l2_norm(delta)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    out = {k: (np.asarray(old[k], dtype=np.float64) + d * scale).astype(np.asarray(new[k]).dtype) for k, d in delta.items()}
    return out, norm


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
