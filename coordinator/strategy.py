"""Aggregation of base-adapter updates: validation of every reply, then either user-level
DP-FedAvg (shared/aggregation.py, THE round maths) or, without DP, Flower's FedAvg / FedAdam /
FedProx over bounded updates; FFA-LoRA's B-only exchange; the privacy ledger and its budget.

A reply is aggregated only if it carries exactly the tensors that were sent (same keys, same
shapes, finite values) and, without DP, a positive finite example count; anything else is
rejected with a logged reason and the round goes on with the rest.

- Under DP (`aggregate_dp`): every accepted update is clipped to C by the coordinator whatever
  the client did (clients clip too: Flower's `fixedclipping_mod`, asked for by the clipping norm
  in the train config), summed, divided by the fixed q·N and noised with std z·C/(q·N); the round
  is accounted as one Poisson-subsampled Gaussian step (z, q) whoever replied.
- Without DP (`bound_updates`): each update is clipped to `federation.max_update_norm` and each
  example count is capped at `federation.max_weight_ratio` x the round's lower-median count
  before Flower's strategy averages them, so one client can neither push the global adapter
  further than the bound nor take over the weighted average.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from shared.config import FederatedSpec
from shared.metrics import ROOT_MEAN_SQUARE
from shared.aggregation import Mechanism, RoundResult, bounded, dp_fedavg_round, robust_weights
from shared.privacy import Accountant, PrivacyEvent
from shared.protocol import AGG_WEIGHT, ARRAYS, METRICS, NUM_EXAMPLES, is_lora_b

log = logging.getLogger("oppu.strategy")

CLIPPING_NORM_KEY = "clipping_norm"  # flwr.supercore.differential_privacy.KEY_CLIPPING_NORM


def build_strategy(spec: FederatedSpec) -> Any:
    """The inner Flower strategy (kept for the whole run: FedAdam has server-side moments)."""
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    f = spec.federation
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                  min_available_nodes=1, weighted_by_key=AGG_WEIGHT, arrayrecord_key=ARRAYS)
    if f.strategy == "fedadam":
        return FedAdam(**common, eta=f.server_lr, beta_1=f.server_beta1, beta_2=f.server_beta2, tau=f.server_tau)
    if f.strategy == "fedprox":
        return FedProx(**common, proximal_mu=f.proximal_mu)
    return FedAvg(**common)


def train_config(spec: FederatedSpec, record: Mapping[str, Any]) -> dict[str, Any]:
    """The train messages' config: under DP it names the clipping norm, which makes the client's
    `fixedclipping_mod` clip its update before it leaves (the coordinator clips again)."""
    out = dict(record)
    if spec.dp:
        out[CLIPPING_NORM_KEY] = spec.experiment.privacy.clipping_norm
    return out


def mechanism(spec: FederatedSpec) -> Mechanism:
    """The run's DP-FedAvg parameters: z and C from [privacy], q = federation.fraction_train."""
    p = spec.experiment.privacy
    return Mechanism(noise_multiplier=p.noise_multiplier, clipping_norm=p.clipping_norm,
                     sample_rate=spec.federation.fraction_train)


class SampledGrid:
    """The grid as a strategy's sampler should see it this round: only the nodes we sampled."""

    def __init__(self, grid: Any, nodes: Iterable[int]) -> None:
        self._grid = grid
        self._nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def exchanged(state: Mapping[str, Any], *, ffa_lora: bool) -> dict[str, np.ndarray]:
    """The base-adapter tensors that travel: all of them, or only LoRA B under FFA-LoRA."""
    out = {}
    for k, v in state.items():
        if ffa_lora and not is_lora_b(k):
            continue
        out[k] = v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v, dtype=np.float32)
    return out


def validate_reply(reply: Any, expected: Mapping[str, tuple[int, ...]], *, federate: bool,
                   dp: bool = False) -> str | None:
    """None if the reply may be aggregated, else why not. Under DP the example count is not
    needed (every user weighs the same) and a deployed client does not send it."""
    if reply.has_error():
        return f"client error: {reply.error.reason}"
    content = reply.content
    metrics = content.metric_records.get(METRICS)
    if metrics is None or len(content.metric_records) != 1:
        return "no single metrics record"
    n = metrics.get(NUM_EXAMPLES)
    if (not dp or n is not None) and (
            not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n) or n <= 0):
        return f"{NUM_EXAMPLES}={n!r} is not a positive finite number"
    if not federate:
        return "unexpected tensors in a round that does not federate the base adapter" if content.array_records else None
    arrays = content.array_records.get(ARRAYS)
    if arrays is None or len(content.array_records) != 1:
        return "no single base-adapter record"
    missing, unknown = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or unknown:
        return f"wrong keys (missing {missing[:2]}, unknown {unknown[:2]})"
    for k, shape in expected.items():
        a = arrays[k]
        if tuple(a.shape) != tuple(shape):
            return f"wrong shape for {k}: {tuple(a.shape)}, expected {tuple(shape)}"
        v = a.numpy()
        if not np.issubdtype(v.dtype, np.floating):
            return f"{k} has dtype {v.dtype}, expected floating point"
        if not np.isfinite(v).all():
            return f"{k} holds NaN or inf"
    return None


@dataclass
class Screened:
    accepted: list[Any] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)  # node -> reason


def screen(replies: Iterable[Any], expected: Mapping[str, tuple[int, ...]], *, federate: bool, dp: bool) -> Screened:
    """Validate every reply; keep those that may be aggregated."""
    out = Screened()
    for reply in replies:
        node = reply.metadata.src_node_id
        reason = validate_reply(reply, expected, federate=federate, dp=dp)
        if reason is not None:
            out.rejected[node] = reason
            log.warning("round update from node %s rejected: %s", node, reason)
            continue
        out.accepted.append(reply)
    return out


def bound_updates(accepted: list[Any], global_state: Mapping[str, np.ndarray], *, max_norm: float,
                  max_weight_ratio: float) -> int:
    """Without DP, before Flower's strategy averages the accepted replies (in place): each update
    clipped to `max_norm` around the global tensors (0: unbounded), each example count capped
    (shared.aggregation.robust_weights) as the aggregation weight. Returns how many were clipped."""
    from flwr.app import Array, ArrayRecord

    weights = robust_weights([float(r.content[METRICS][NUM_EXAMPLES]) for r in accepted], max_ratio=max_weight_ratio)
    clipped = 0
    for reply, w in zip(accepted, weights):
        reply.content[METRICS][AGG_WEIGHT] = w
        if ARRAYS not in reply.content.array_records:
            continue
        record = reply.content[ARRAYS]
        new, n = bounded({k: record[k].numpy() for k in global_state}, global_state, bound=max_norm)
        if max_norm > 0 and n > max_norm:
            clipped += 1
            log.warning("update from node %s has norm %.3g > federation.max_update_norm %.3g: clipped",
                        reply.metadata.src_node_id, n, max_norm)
            reply.content[ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(new[k])) for k in record})
    return clipped


def aggregate_dp(accepted: list[Any], global_state: Mapping[str, np.ndarray], spec: FederatedSpec, *,
                 population: int, rng: np.random.Generator) -> RoundResult:
    """The coordinator's DP-FedAvg round over the accepted replies (the Flower path): THE round
    of shared/aggregation.py with the run's mechanism, q·N = fraction_train x connected users."""
    updates = [{k: reply.content[ARRAYS][k].numpy() for k in global_state} for reply in accepted]
    return dp_fedavg_round(global_state, updates, mechanism=mechanism(spec), population=population, rng=rng)


def align_metric_keys(replies: list[Any]) -> None:
    """Keep in each accepted reply's metrics only the keys every reply has (in place)."""
    if not replies:
        return
    common = set.intersection(*(set(r.content[METRICS]) for r in replies))
    for r in replies:
        rec = r.content[METRICS]
        for k in [k for k in rec if k not in common]:
            del rec[k]


def mean_metrics(records: Iterable[Mapping[str, Any]], weight_key: str) -> dict[str, float]:
    """Weighted mean of every numeric entry (weight 0 records skipped). Root-mean-square errors
    (shared.metrics.ROOT_MEAN_SQUARE, keys "<method>/rmse") combine as the root of the weighted
    mean of their squares, so that with query counts as weights the result is the RMSE over all
    users' queries pooled, as the run's metrics.md reports it, not a mean of per-user RMSEs."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for rec in records:
        w = float(rec.get(weight_key, 0) or 0)
        if w <= 0:
            continue
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != weight_key:
                sums[k] = sums.get(k, 0.0) + w * (float(v) ** 2 if _quadratic(k) else float(v))
                weights[k] = weights.get(k, 0.0) + w
        sums[weight_key] = sums.get(weight_key, 0.0) + w
        weights[weight_key] = 1.0
    return {k: math.sqrt(sums[k] / weights[k]) if _quadratic(k) else sums[k] / weights[k] for k in sums}


def _quadratic(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in ROOT_MEAN_SQUARE


# ------------------------------------------------------------------------- privacy accounting


class Accounting:
    """The run's privacy ledger: one Poisson-subsampled Gaussian step (z, q) per DP round. It
    reports the tightest correct epsilon (shared.privacy.Accountant: the smaller of the RDP and
    PRV bounds), and the budget stop uses the same number."""

    def __init__(self, spec: FederatedSpec, state: Mapping[str, Any] | None = None) -> None:
        p = spec.experiment.privacy
        self.enabled = spec.dp
        self.noise_multiplier, self.delta, self.budget = p.noise_multiplier, p.delta, p.epsilon_budget
        self.accountant = Accountant.from_state_dict(state) if state else Accountant()

    def epsilon(self) -> float | None:
        return self.accountant.epsilon(delta=self.delta) if self.enabled else None

    def report(self) -> dict[str, float] | None:
        """epsilon (the one reported), epsilon_rdp, epsilon_prv, delta; None without DP."""
        return self.accountant.report(delta=self.delta) if self.enabled else None

    def projected(self, *, sample_rate: float) -> float | None:
        if not self.enabled:
            return None
        return self.accountant.epsilon_after(delta=self.delta, noise_multiplier=self.noise_multiplier,
                                             sample_rate=sample_rate)

    def would_exceed(self, *, sample_rate: float) -> bool:
        return self.enabled and self.accountant.would_exceed(
            budget=self.budget, delta=self.delta, noise_multiplier=self.noise_multiplier, sample_rate=sample_rate)

    def record(self, event: PrivacyEvent | None) -> None:
        """Compose one released round (`RoundResult.event`); nothing without DP."""
        if not self.enabled or event is None:
            return
        self.accountant.step(noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate, steps=event.steps)

    def state_dict(self) -> dict[str, Any]:
        return self.accountant.state_dict()


# ------------------------------------------------------------------------- strategy state


def strategy_state(inner: Any) -> dict[str, np.ndarray]:
    """Server-side optimizer state that a resumed run needs (FedAdam's moments)."""
    out: dict[str, np.ndarray] = {}
    for name in ("m_t", "v_t"):
        moments = getattr(inner, name, None)
        if moments:
            out.update({f"{name}/{k}": np.asarray(v) for k, v in moments.items()})
    return out


def load_strategy_state(inner: Any, state: Mapping[str, np.ndarray]) -> None:
    for name in ("m_t", "v_t"):
        moments = {k.split("/", 1)[1]: np.asarray(v) for k, v in state.items() if k.startswith(f"{name}/")}
        if moments and hasattr(inner, name):
            setattr(inner, name, moments)
