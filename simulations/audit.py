"""`oppu audit privacy`: an empirical lower bound on the user-level epsilon of THE DP-FedAvg
mechanism (shared/aggregation.py), beside the accountant's epsilon for the same run.

A privacy accountant is an upper bound proved on paper; an audit measures what the code
actually leaks, so a bug (noise too small, a denominator that depends on the data, clipping that
does not happen) shows up as a lower bound above the accounted epsilon (Jagielski, Ullman and
Oprea, "Auditing Differentially Private Machine Learning: How Private is Private SGD?",
NeurIPS 2020; Nasr et al., "Adversary Instantiation", IEEE S&P 2021).

The game, repeated for `trials` independent runs of `rounds` rounds each:

1. A population of `users` honest users plus one canary slot. A fair coin decides whether the
   canary's data is in (member) or not (non-member); the population count the mechanism is told
   is the same either way (N is public), so the two worlds differ in exactly one user's data.
2. Each round is THE round of the coordinator: Poisson participation with q
   (`shared.aggregation.participants`), then `shared.aggregation.dp_fedavg_round` (clipping to C,
   fixed denominator q·N, Gaussian noise z·C/(q·N)). Honest users send random updates in every
   coordinate but the first; the canary, when it is a member and sampled, sends the update most
   distinguishable from nothing: norm C along the first coordinate, which no honest update
   touches (the worst case the DP definition must cover).
3. The auditor sees every released adapter and scores the run by how far the first coordinate
   moved in all; it says "member" above a threshold chosen on as many separate calibration runs
   (other trial numbers and coins), never on the runs the bound is computed from, so the bound
   below holds as stated.
4. Any (epsilon, delta)-DP mechanism forces every such test to FPR + e^epsilon · FNR >= 1 - delta
   and FNR + e^epsilon · FPR >= 1 - delta (Kairouz et al. 2015). With Clopper-Pearson upper
   confidence bounds on FPR and FNR (each at 1 - alpha/2), epsilon_lower = max over the two of
   ln((1 - delta - FNR_upper) / FPR_upper) holds with confidence 1 - alpha.

Honest updates and the canary are plain NumPy arrays (the audit is about the aggregation, which
is the same code whatever trained the updates), so a few hundred trials take seconds. The
accounted epsilon comes from the coordinator's ledger (the smaller of the RDP and PRV bounds) for
`rounds` steps of (z, q).

The defaults (z = 2, q = 0.8, 15 users, 2 rounds, 1000 runs and 1000 calibration runs) take a
few seconds and are
sized so that the test can tell: the correct mechanism's lower bound stays below its accounted
epsilon (2.56 at delta = 1e-5), and the same mechanism with its noise divided by 10 is caught
(tests/simulations/test_privacy_audit.py).

Output (`--out`, default runs/<time>-audit-privacy/): audit.json and audit.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared import aggregation
from shared.fileio import atomic_write
from shared.privacy import Accountant


@dataclass(frozen=True)
class AuditSpec:
    """One audit: the mechanism's parameters, the population and how many runs to play."""

    noise_multiplier: float = field(default=2.0, metadata={"help": "z of the audited mechanism."})
    clipping_norm: float = field(default=1.0, metadata={"help": "C of the audited mechanism."})
    sample_rate: float = field(default=0.8, metadata={"help": "q: each user's probability of taking part in a round."})
    users: int = field(default=15, metadata={"help": "Honest users (the population is these plus the canary's slot)."})
    rounds: int = field(default=2, metadata={"help": "Rounds per run (the auditor sees every release)."})
    trials: int = field(default=1000, metadata={"help": "Independent runs (about half with the canary in)."})
    dimension: int = field(default=16, metadata={"help": "Coordinates of the audited update (plus the canary's)."})
    canary_scale: float = field(
        default=1.0, metadata={"help": "The canary's update norm in units of C; above 1 it tests the server-side clipping."}
    )
    delta: float = field(default=1e-5, metadata={"help": "The delta at which both epsilons are stated."})
    confidence: float = field(default=0.95, metadata={"help": "Confidence of the lower bound."})
    seed: int = field(default=0, metadata={"help": "Seed of the coins, the participation and the noise."})

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"audit.noise_multiplier={self.noise_multiplier!r} must be a finite number >= 0")
        if not self.clipping_norm > 0:
            raise ValueError(f"audit.clipping_norm={self.clipping_norm!r} must be > 0")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"audit.sample_rate={self.sample_rate!r} must be in (0, 1]")
        for name in ("users", "rounds", "trials", "dimension"):
            if getattr(self, name) < 1:
                raise ValueError(f"audit.{name}={getattr(self, name)!r} must be >= 1")
        if self.trials < 20:
            raise ValueError(f"audit.trials={self.trials!r}: at least 20 runs are needed for a bound")
        if not 0 < self.delta < 1:
            raise ValueError(f"audit.delta={self.delta!r} must be in (0, 1)")
        if not 0 < self.confidence < 1:
            raise ValueError(f"audit.confidence={self.confidence!r} must be in (0, 1)")
        if not self.canary_scale > 0:
            raise ValueError(f"audit.canary_scale={self.canary_scale!r} must be > 0")


# ------------------------------------------------------------------------------------ the bound


def clopper_pearson_upper(errors: int, n: int, *, alpha: float) -> float:
    """One-sided (1 - alpha) upper confidence bound on a binomial proportion."""
    from scipy.stats import beta

    if n <= 0:
        return 1.0
    if errors >= n:
        return 1.0
    return float(beta.ppf(1 - alpha, errors + 1, n - errors))


def epsilon_lower_bound(*, false_positives: int, negatives: int, false_negatives: int, positives: int,
                        delta: float, confidence: float) -> dict[str, float]:
    """The largest epsilon the observed error rates rule out (with `confidence`), for any test of
    an (epsilon, delta)-DP mechanism; 0 when they rule out nothing."""
    alpha = (1 - confidence) / 2  # union bound over the two rates
    fpr = clopper_pearson_upper(false_positives, negatives, alpha=alpha)
    fnr = clopper_pearson_upper(false_negatives, positives, alpha=alpha)
    candidates = [0.0]
    for a, b in ((fnr, fpr), (fpr, fnr)):
        if 1 - delta - a > 0 and b > 0:
            candidates.append(math.log((1 - delta - a) / b))
    return {"epsilon_lower": max(candidates), "fpr_upper": fpr, "fnr_upper": fnr}


# ------------------------------------------------------------------------------------ the game


def _honest_update(rng: np.random.Generator, dim: int, clip: float) -> np.ndarray:
    """A delta that leaves the canary's coordinate alone; norms around C, some above (clipped)."""
    d = np.zeros(dim + 1)
    d[1:] = rng.normal(size=dim)
    return d * (clip * rng.uniform(0.5, 1.5) / np.linalg.norm(d[1:]))


def play(spec: AuditSpec, trial: int, member: bool) -> float:
    """One run of the game: how far the released adapters moved the canary's coordinate."""
    seed = spec.seed * 1_000_003 + trial
    rng = np.random.default_rng([spec.seed, trial, 3])
    mech = aggregation.Mechanism(noise_multiplier=spec.noise_multiplier, clipping_norm=spec.clipping_norm,
                                 sample_rate=spec.sample_rate)
    population = spec.users + 1  # slot `users` is the canary's, member or not
    state = {"adapter": np.zeros(spec.dimension + 1, dtype=np.float32)}
    start = float(state["adapter"][0])
    for rnd in range(1, spec.rounds + 1):
        updates = []
        for i in aggregation.participants(population, sample_rate=spec.sample_rate, seed=seed, rnd=rnd):
            if i < spec.users:
                updates.append({"adapter": state["adapter"] + _honest_update(rng, spec.dimension, spec.clipping_norm)})
            elif member:
                canary = np.zeros(spec.dimension + 1)
                canary[0] = spec.clipping_norm * spec.canary_scale
                updates.append({"adapter": state["adapter"] + canary})
        released = aggregation.dp_fedavg_round(state, updates, mechanism=mech, population=population,
                                               rng=aggregation.noise_generator(seed, rnd))
        state = released.state
    return float(state["adapter"][0]) - start


def _errors(scores: list[float], coins: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(false positives, non-members, false negatives, members) of "member iff score > threshold"."""
    members = [x for x, c in zip(scores, coins) if c]
    others = [x for x, c in zip(scores, coins) if not c]
    return (sum(1 for x in others if x > threshold), len(others),
            sum(1 for x in members if x <= threshold), len(members))


def choose_threshold(spec: AuditSpec) -> float:
    """The threshold, chosen on `trials` calibration runs that the bound never sees (other trial
    numbers, other coins): the one whose lower bound is largest there. Choosing it on the
    evaluation runs themselves would bias the bound upwards."""
    coins = np.random.default_rng([spec.seed, 1, 4]).integers(0, 2, size=spec.trials).astype(bool)
    scores = [play(spec, spec.trials + t, bool(coins[t])) for t in range(spec.trials)]
    # Candidates: midway between the worlds' expectations under the mechanism's claim, and the
    # calibration scores themselves.
    candidates = [spec.rounds * spec.clipping_norm / (spec.users + 1) / 2, *scores]
    def bound(th: float) -> float:
        fp, n, fn, p = _errors(scores, coins, th)
        return epsilon_lower_bound(false_positives=fp, negatives=n, false_negatives=fn, positives=p,
                                   delta=spec.delta, confidence=spec.confidence)["epsilon_lower"]

    return max(candidates, key=bound)


def run_audit(spec: AuditSpec) -> dict[str, Any]:
    """Play the game `trials` times (after as many calibration runs) and compare the empirical
    lower bound with the accountant's epsilon."""
    t0 = time.time()
    threshold = choose_threshold(spec)
    coins = np.random.default_rng([spec.seed, 0, 4]).integers(0, 2, size=spec.trials).astype(bool)
    scores = [play(spec, t, bool(coins[t])) for t in range(spec.trials)]
    fp, n_others, fn, n_members = _errors(scores, coins, threshold)
    bound = epsilon_lower_bound(false_positives=fp, negatives=n_others, false_negatives=fn,
                                positives=n_members, delta=spec.delta, confidence=spec.confidence)
    ledger = Accountant()
    accounted: dict[str, Any] = {"epsilon": None, "epsilon_rdp": None, "epsilon_prv": None}  # None: infinite
    if spec.noise_multiplier > 0:
        ledger.step(noise_multiplier=spec.noise_multiplier, sample_rate=spec.sample_rate, steps=spec.rounds)
        accounted = ledger.report(delta=spec.delta)
    consistent = accounted["epsilon"] is None or bound["epsilon_lower"] <= accounted["epsilon"]
    return {
        "settings": dataclasses.asdict(spec),
        "mechanism": "shared.aggregation.dp_fedavg_round with Poisson participation (the coordinator's round)",
        "canary": "one user whose update is norm C along a coordinate no honest update touches",
        "threshold": threshold, "members": n_members, "nonmembers": n_others,
        "false_negatives": fn, "false_positives": fp,
        "fnr": fn / max(1, n_members), "fpr": fp / max(1, n_others),
        **bound,
        "accounted_epsilon": accounted["epsilon"], "accounted_epsilon_rdp": accounted["epsilon_rdp"],
        "accounted_epsilon_prv": accounted["epsilon_prv"],
        "consistent": consistent,
        "verdict": ("consistent: the measured lower bound does not exceed the accounted epsilon" if consistent else
                    "VIOLATION: the mechanism leaks more than the accountant says (a bug in the noise, clipping, "
                    "sampling or accounting)"),
        "seconds": time.time() - t0,
    }


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    def fmt(v: float | None) -> str:
        return "∞" if v is None else f"{v:.3f}"

    lines = [
        "## Privacy audit of DP-FedAvg (shared/aggregation.py)", "",
        f"Mechanism: z = {s['noise_multiplier']:g}, C = {s['clipping_norm']:g}, q = {s['sample_rate']:g}, "
        f"N = {s['users']} honest users + 1 canary slot, {s['rounds']} round(s) per run; {s['trials']} runs "
        f"({result['members']} with the canary, {result['nonmembers']} without); delta = {s['delta']:g}.", "",
        "| | value |", "|---|---|",
        f"| accounted epsilon (smaller of RDP and PRV) | {fmt(result['accounted_epsilon'])} |",
        f"| accounted epsilon, RDP alone | {fmt(result['accounted_epsilon_rdp'])} |",
        f"| empirical lower bound ({s['confidence']:.0%} confidence) | {result['epsilon_lower']:.3f} |",
        f"| false negatives / members | {result['false_negatives']} / {result['members']} "
        f"(upper bound {result['fnr_upper']:.3f}) |",
        f"| false positives / non-members | {result['false_positives']} / {result['nonmembers']} "
        f"(upper bound {result['fpr_upper']:.3f}) |", "",
        f"Verdict: {result['verdict']}.", "",
        "The canary's update has norm C along a coordinate no honest update uses; the auditor sees every "
        "released adapter and calls the canary present when that coordinate moved by more than "
        f"{result['threshold']:.4g} in all (chosen on {s['trials']} separate calibration runs). "
        "The lower bound is the Clopper-Pearson one of Jagielski et al. (2020); even a test that never errs "
        "cannot certify more than about ln(runs / 7) with these many runs, so a bound well under the accounted "
        "epsilon says what this test can see, not that the accountant is loose.", "",
        f"Wall time: {result['seconds']:.1f} s.", "",
    ]
    return "\n".join(lines)


def write_audit(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "audit.json", json.dumps(result, indent=2))
    atomic_write(out_dir / "audit.md", render(result))
    return out_dir
