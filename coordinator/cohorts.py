"""A simulated round's personal phase: the sampled simulated users in cohorts, each cohort's
personal adapters trained by one worker in one pass (query.personalize, client/cohort.py).

Why: Flower's simulation engine gives a worker one message, so one user, at a time, and one
user's personal training leaves fast matrix units idle (shared/group_training.py). Before the
round's train messages the coordinator sends each cohort of at most `train.users_per_pass`
users (in at least as many cohorts as the simulation has workers, so none idles) to the first
of them; that user's worker trains all of them together. Users whose cohort answered get train
messages without personal methods (their adapters are published already);
a cohort that fails or times out changes nothing: its users' train messages train them one at a
time, as without cohorts.

Only simulated users (known by partition id: coordinator/sampling.py) are put in cohorts, and
only where a pass can hold several users: LoRA personal adapters, no record-level DP-SGD on
them (each user's noisy steps are its own), no SecAgg+ (its train messages carry one config for
all). Deployed clients never receive query.personalize.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from shared.config import FederatedSpec
from shared.personalize import PERSONAL_METHODS
from shared.protocol import ARRAYS, COHORT, CONFIG, METRICS, PARTITIONS, PERSONALIZE, REPLY, RoundConfig

from .sampling import NodeNames

log = logging.getLogger("oppu.coordinator")


def applies(spec: FederatedSpec, methods: list[str]) -> bool:
    """Whether a round of this run puts its simulated users in cohorts (module docstring)."""
    e = spec.experiment
    return (e.personal_train.users_per_pass > 1 and not spec.federation.secagg and e.personal_adapter.peft_type == "lora"
            and e.privacy.record_level not in ("personal", "both") and any(m in PERSONAL_METHODS for m in methods))


def workers(spec: FederatedSpec) -> int | None:
    """How many users the simulation trains at once: on this machine (no federation.ray_address)
    its cores over sim_client_cpus, the Ray actors simulations/simulate.py starts; on a cluster
    not known here (None)."""
    f = spec.federation
    return None if f.ray_address else max(1, int((os.cpu_count() or 1) // f.sim_client_cpus))


def split(users: list[Any], per_pass: int, workers: int | None = None) -> list[list[Any]]:
    """`users` in cohorts of at most `per_pass`, as even as possible (5 by 4: 3 + 2, not 4 + 1), in
    order, and in at least as many cohorts as there are `workers` to take them (a cohort keeps
    one worker busy for all its users: with 2 users on 2 workers each trains alone, in parallel);
    a cohort of one is left out (its train message trains it as before)."""
    if per_pass < 2 or len(users) < 2:
        return []
    count = max(math.ceil(len(users) / per_pass), min(workers or 1, len(users)))
    size, extra = divmod(len(users), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(users[start:end])
        start = end
    return [c for c in out if len(c) > 1]


def cohorts(spec: FederatedSpec, names: NodeNames, ready: list[int], cfg: RoundConfig) -> list[list[int]]:
    """The round's cohorts of node ids (simulated users only, in `ready`'s order); [] where
    cohorts do not apply."""
    if not applies(spec, cfg.method_list):
        return []
    return split([n for n in ready if names.key(n)[0] == 0], spec.experiment.personal_train.users_per_pass,
                 workers(spec))


def personal_phase(grid: Any, names: NodeNames, groups: list[list[int]], arrays: Any, cfg: RoundConfig, *,
                   timeout: float) -> tuple[set[int], dict[str, float]]:
    """Send each cohort to its first user's worker and wait. Returns the node ids whose personal
    adapters were trained this way, and the round's numbers for them (users, cohorts, mean final
    training loss per augmentation)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    by_carrier = {group[0]: group for group in groups}
    msgs = [Message(RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(cfg.to_record()),
                                COHORT: ConfigRecord({PARTITIONS: [names.key(n)[1] for n in group]})}),
                    dst_node_id=group[0], message_type=PERSONALIZE) for group in groups]
    done: set[int] = set()
    losses: dict[str, list[tuple[float, float]]] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        carrier = reply.metadata.src_node_id
        group = by_carrier.get(carrier)
        if group is None:
            continue
        if reply.has_error():
            log.warning("cohort of %s: personal phase failed (%s); its users train one at a time",
                        names.label(carrier), reply.error.reason)
            continue
        trained = reply.content[REPLY].get(PARTITIONS) if REPLY in reply.content.config_records else None
        if list(trained or []) != [names.key(n)[1] for n in group]:
            log.warning("cohort of %s: the reply names other users; they train one at a time", names.label(carrier))
            continue
        done.update(group)
        numbers = reply.content[METRICS] if METRICS in reply.content.metric_records else {}
        for key, value in numbers.items():
            if key.startswith("personal-") and key.endswith("-loss") and math.isfinite(value):
                losses.setdefault(key, []).append((float(value), float(len(group))))
    out = {"cohorts": float(len(groups)), "users": float(len(done))}
    out.update({k: sum(v * w for v, w in pairs) / sum(w for _, w in pairs) for k, pairs in losses.items()})
    return done, out
