"""Aggregation of base-adapter updates: Flower's FedAvg / FedAdam / FedProx, FFA-LoRA's B-only
exchange, validation of every update before it is aggregated, user-level DP (Flower's
client-side fixed clipping wrapper adds the noise) and our own RDP accounting with a budget.

A reply is aggregated only if it carries exactly the tensors that were sent (same keys, same
shapes, finite values) and a positive finite example count; anything else is rejected with a
logged reason and the round goes on with the rest. Under DP every accepted update weighs the
same (the clipping bound is per user, so weighting by example counts would scale a user's
influence past it), the noise is calibrated to the number of users sampled, and the round is
accounted as one sampled-Gaussian step with q = sampled / connected users; if fewer replies
than sampled were aggregated the effective noise multiplier is z · accepted / sampled.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from shared.config import FederatedSpec
from shared.metrics import ROOT_MEAN_SQUARE
from shared.privacy import RDPAccountant
from shared.protocol import AGG_WEIGHT, ARRAYS, METRICS, NUM_EXAMPLES, is_lora_b

log = logging.getLogger("oppu.strategy")


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


def for_round(inner: Any, spec: FederatedSpec, num_sampled: int) -> Any:
    """Under DP, Flower's client-side fixed-clipping wrapper around the inner strategy: it sends
    the clipping norm (the clients' `fixedclipping_mod` clips) and adds the Gaussian noise."""
    if not spec.dp:
        return inner
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    p = spec.experiment.privacy
    return DifferentialPrivacyClientSideFixedClipping(inner, p.noise_multiplier, p.clipping_norm, num_sampled)


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


def validate_reply(reply: Any, expected: Mapping[str, tuple[int, ...]], *, federate: bool) -> str | None:
    """None if the reply may be aggregated, else why not."""
    if reply.has_error():
        return f"client error: {reply.error.reason}"
    content = reply.content
    metrics = content.metric_records.get(METRICS)
    if metrics is None or len(content.metric_records) != 1:
        return "no single metrics record"
    n = metrics.get(NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n) or n <= 0:
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
    """Validate every reply; set the aggregation weight of those accepted."""
    out = Screened()
    for reply in replies:
        node = reply.metadata.src_node_id
        reason = validate_reply(reply, expected, federate=federate)
        if reason is not None:
            out.rejected[node] = reason
            log.warning("round update from node %s rejected: %s", node, reason)
            continue
        metrics = reply.content[METRICS]
        metrics[AGG_WEIGHT] = 1.0 if dp else float(metrics[NUM_EXAMPLES])
        out.accepted.append(reply)
    return out


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
    """The run's privacy ledger: one sampled-Gaussian step per aggregated DP round."""

    def __init__(self, spec: FederatedSpec, state: Mapping[str, Any] | None = None) -> None:
        p = spec.experiment.privacy
        self.enabled = spec.dp
        self.noise_multiplier, self.delta, self.budget = p.noise_multiplier, p.delta, p.epsilon_budget
        self.accountant = RDPAccountant.from_state_dict(state) if state else RDPAccountant()

    def epsilon(self) -> float | None:
        return self.accountant.epsilon(delta=self.delta) if self.enabled else None

    def projected(self, *, sample_rate: float) -> float | None:
        if not self.enabled:
            return None
        return self.accountant.epsilon_after(delta=self.delta, noise_multiplier=self.noise_multiplier,
                                             sample_rate=sample_rate)

    def would_exceed(self, *, sample_rate: float) -> bool:
        return self.enabled and self.accountant.would_exceed(
            budget=self.budget, delta=self.delta, noise_multiplier=self.noise_multiplier, sample_rate=sample_rate)

    def would_exceed_with(self, *, sample_rate: float, sampled: int, aggregated: int) -> bool:
        """Would releasing an aggregate of `aggregated` of `sampled` updates break the budget?"""
        if not self.enabled or aggregated == 0:
            return False
        return self.accountant.would_exceed(budget=self.budget, delta=self.delta, sample_rate=sample_rate,
                                            noise_multiplier=self.noise_multiplier * aggregated / sampled)

    def record(self, *, sample_rate: float, sampled: int, aggregated: int) -> None:
        if not self.enabled or aggregated == 0:
            return
        z_eff = self.noise_multiplier * aggregated / sampled
        self.accountant.step(noise_multiplier=z_eff, sample_rate=sample_rate)

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
