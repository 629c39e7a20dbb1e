"""A simulation worker's share of a round's personal phase: several sampled users' personal
adapters trained in one pass (query.personalize; the coordinator forms the cohorts in
coordinator/cohorts.py).

Why: one user's personal training leaves fast matrix units waiting on per-step overhead
(shared/group_training.py); the simulation engine hands a worker one message, i.e. one user, at a
time. So before a round's train messages the coordinator sends each cohort of up to
`train.users_per_pass` sampled simulated users to one worker, which trains their fresh personal
adapters together (shared.selection.train_and_select_users: the same hold-out, base score,
checkpoints and adoption rule per user, each adapter equal within rounding to the one trained
alone) and publishes each in its own user's directory exactly as the user's train message would
(client.rounds.keep_personal). Those users' train messages then carry no personal methods.

A user whose adapter is refreshed (continued from its published one) or trained under DP-SGD is
trained alone (client.rounds.train_alone), in the same worker. Only a simulated user's
node does this: it reaches the other users' directories through the run's users/index.json, the
researcher's own data; a deployed client, which holds one user's data, refuses the message.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping

import numpy as np

from shared.protocol import ClientError, RoundConfig
from shared.selection import train_and_select_users

from . import rounds
from .userdir import UserDir

log = logging.getLogger("oppu.client")


def peer(node: rounds.Node, pid: int) -> rounds.Node:
    """Simulated user `pid` of this node's run, served by this worker (its cache, its settings)."""
    return rounds.Node(node.spec, UserDir(rounds.simulated_user_dir(node.spec, pid)), node.cache, simulated=True,
                       allow_metrics=node.allow_metrics)


def personalize_cohort(node: rounds.Node, cfg: RoundConfig, arrays: Mapping[str, np.ndarray],
                       partitions: list[int]) -> dict[str, float]:
    """Train and publish the personal adapters of simulated users `partitions` for the round's
    personal methods, on the round's base adapter `arrays`. Returns numbers only: the users'
    mean final training loss per augmentation, and how many users were trained together."""
    if not node.simulated:
        raise ClientError("query.personalize trains several simulated users' personal adapters; "
                          "a deployed client holds one user's data and refuses it")
    users = [peer(node, pid) for pid in partitions]
    engine = rounds.engine_for(node, cfg.model)
    task = rounds.task_for(users[0], cfg)
    for user in users[1:]:
        rounds.task_for(user, cfg)
    spec = node.spec.experiment
    metrics: dict[str, float] = {"personal-users": float(len(users)), "personal-together": 0.0}
    with engine.lock, contextlib.ExitStack() as stores:
        rounds.set_global_base(engine, node, cfg, arrays)
        opened = [stores.enter_context(rounds.history_store(user, task)) for user in users]
        histories = [store.items() for store in opened]
        contexts = [rounds.context_for(user, task, store) for user, store in zip(users, opened)]
        for aug in rounds.augmentations(cfg.method_list):
            losses: list[float | None] = []
            plans = [rounds.plan_personal(engine, user, task, ctx, history, aug)
                     for user, ctx, history in zip(users, contexts, histories)]
            together = [i for i, plan in enumerate(plans) if plan is not None and plan.refresh is None and plan.dp is None]
            for i, plan in enumerate(plans):
                if plan is not None and i not in together:  # refreshed or DP-SGD: alone, as its train message would
                    losses.append(rounds.train_alone(engine, users[i], task, histories[i], aug, cfg, plan))
            trained = train_and_select_users(engine, task, [plans[i].examples for i in together], spec.personal_train,
                                             spec.selection, progress=False)
            try:
                for i, (result, sel, state) in zip(together, trained):
                    if state is not None:
                        engine.set_personal_state(state, label="trained")
                    else:
                        engine.reset_personal()
                    losses.append(rounds.keep_personal(engine, users[i], task, histories[i], aug, cfg, plans[i],
                                                       result, sel))
            finally:
                engine.reset_personal()
            done = [loss for loss in losses if loss is not None]
            if done:
                metrics[f"personal-{aug}-loss"] = float(np.mean(done))
            metrics["personal-together"] = max(metrics["personal-together"], float(len(together)))
    log.info("round %d: personal adapters of %d simulated users (%d trained together)", cfg.server_round,
             len(users), int(metrics["personal-together"]))
    return metrics
