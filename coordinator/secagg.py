"""Secure aggregation of base-adapter updates with Flower's SecAgg+ workflow.

Flower 1.42 ships SecAgg+ only for its legacy (FitIns/FitRes) strategies: `SecAggPlusWorkflow` runs
inside a `LegacyContext`, asks `strategy.configure_fit` for the instructions and hands the
securely summed, weighted average to `strategy.aggregate_fit`. `_Capture` is that legacy strategy
for one round: it sends our arrays and RoundConfig (key names in `oppu-keys`, since legacy
parameters are an ordered list) and captures the average. On the client, Flower's
`secaggplus_mod` masks the update (client/client_app.py); the coordinator never sees one user's
update, only the sum.

Consequences, by design of the protocol: individual updates cannot be validated (only the
aggregate is checked: keys, shapes, finite values), so each client clips its own update when the
run is private, and the Gaussian noise is then added here to the average (Flower's DP wrapper
needs the individual replies, which SecAgg+ hides) and accounted as in the plain path. Users weigh
the same (an unweighted FedAvg): SecAgg+ scales each update by weight / max_weight before
quantizing it to 2^22 levels over [-8, 8], so unequal weights would cost precision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

log = logging.getLogger("oppu.secagg")

KEYS = "oppu-keys"


@dataclass
class SecureResult:
    average: dict[str, np.ndarray] | None
    aggregated: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def secure_average(grid: Any, nodes: list[int], arrays: Mapping[str, np.ndarray], config: Mapping[str, Any], *,
                   server_round: int, timeout: float) -> SecureResult:
    """One SecAgg+ round over `nodes` (at least 2); the weighted average of their updates."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, parameters_to_ndarrays
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import Strategy as LegacyStrategy
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    keys = list(arrays)

    class _Proxy(ClientProxy):
        def __init__(self, node_id: int) -> None:
            super().__init__(str(node_id))
            self.node_id = node_id

        def get_properties(self, *a: Any, **k: Any) -> Any:
            raise NotImplementedError

        get_parameters = fit = evaluate = reconnect = get_properties

    class _Capture(LegacyStrategy):
        def __init__(self) -> None:
            self.result = SecureResult(None)

        def initialize_parameters(self, client_manager: Any) -> None:
            return None

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            cfg = {**dict(config), KEYS: ",".join(keys)}
            return [(_Proxy(n), FitIns(parameters, cfg)) for n in nodes]

        def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict]:
            self.result.failures = [str(f) for f in failures]
            if results:
                self.result.average = dict(zip(keys, parameters_to_ndarrays(results[0][1].parameters)))
                self.result.aggregated = len(results)
                self.result.metrics = [dict(res.metrics) for _, res in results]
            return None, {}

        def configure_evaluate(self, *a: Any, **k: Any) -> list[Any]:
            return []

        def aggregate_evaluate(self, *a: Any, **k: Any) -> tuple[None, dict]:
            return None, {}

        def evaluate(self, *a: Any, **k: Any) -> None:
            return None

    if len(nodes) < 2:
        return SecureResult(None, failures=["SecAgg+ needs at least 2 users in a round"])
    strategy = _Capture()
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    ctx = LegacyContext(base, strategy=strategy, client_manager=SimpleClientManager())
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord({k: Array(np.asarray(arrays[k])) for k in keys})
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5, max_weight=1.0,
                                  timeout=timeout)
    workflow(grid, ctx)
    return strategy.result
