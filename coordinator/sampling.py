"""Which users train in a round, chosen so that a rerun chooses the same ones.

Flower's simulation engine registers its virtual users under fresh random node ids every run,
so a sample drawn over node ids picks other users when a run directory is rerun. Each client is
therefore asked once (`query.identify`) for a name that survives a restart: a simulated user
answers its partition id (its place in the run's users/index.json); a deployed client answers
nothing and is known by its node id. Nodes are ordered by that name and the round's sample is
drawn over the ordered list:

- under DP, Poisson participation (shared/aggregation.py `participants`): each user
  independently with probability q = federation.fraction_train, from the OS's CSPRNG, or from
  `federation.sampling_seed` when a simulation sets one (the accounting assumes it secret);
- without DP, m = max(min_clients, fraction_train · N) users, seeded by `federation.seed`.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Iterable

from shared.aggregation import participants
from shared.config import FederatedSpec
from shared.protocol import IDENTIFY, REPLY

log = logging.getLogger("oppu.coordinator")


class NodeNames:
    """node id -> stable sort key; (0, partition id) for simulated users, (1, node id) otherwise."""

    def __init__(self, *, timeout: float) -> None:
        self.timeout = timeout
        self.keys: dict[int, tuple[int, int]] = {}

    def key(self, node: int) -> tuple[int, int]:
        return self.keys.get(node, (1, node))

    def order(self, grid: Any, nodes: Iterable[int]) -> list[int]:
        """`nodes` sorted by their stable names; nodes not seen before are asked for theirs."""
        from flwr.app import Message, RecordDict

        nodes = list(nodes)
        new = [n for n in nodes if n not in self.keys]
        if new:
            msgs = [Message(RecordDict(), dst_node_id=n, message_type=IDENTIFY) for n in new]
            for reply in grid.send_and_receive(msgs, timeout=self.timeout):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    # An unanswered identify is asked again next round; until then, the node id.
                    log.info("node %s: identify: %s", node, reply.error.reason)
                    continue
                pid = reply.content[REPLY].get("partition") if REPLY in reply.content.config_records else None
                self.keys[node] = (0, pid) if isinstance(pid, int) and not isinstance(pid, bool) else (1, node)
        return sorted(nodes, key=self.key)

    def label(self, node: int) -> str:
        """What the round log calls a node: `user-3` (simulated, partition 3) or `node-<id>`."""
        kind, value = self.key(node)
        return f"user-{value}" if kind == 0 else f"node-{value}"


def sample(ordered: list[int], m: int, *, seed: int, rnd: int) -> list[int]:
    """m of the ordered nodes, the same positions for the same (seed, round), in that order."""
    picked = set(random.Random(f"{seed}:{rnd}").sample(range(len(ordered)), m))
    return [n for i, n in enumerate(ordered) if i in picked]


def sample_round(ordered: list[int], spec: FederatedSpec, rnd: int) -> tuple[list[int], float]:
    """The round's users (in `ordered`'s order) and the participation rate q the round is
    accounted with: Poisson with q = fraction_train under DP, else a seeded fixed-size sample."""
    f = spec.federation
    if spec.dp:
        seed = f.sampling_seed if f.sampling_seed >= 0 else None
        return [ordered[i] for i in participants(len(ordered), sample_rate=f.fraction_train, seed=seed, rnd=rnd)], \
            f.fraction_train
    m = min(len(ordered), max(f.min_clients, round(f.fraction_train * len(ordered))))
    return sample(ordered, m, seed=f.seed, rnd=rnd), m / len(ordered)
