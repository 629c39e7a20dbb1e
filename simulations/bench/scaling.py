"""Simulation scaling: `oppu simulate` (Flower's simulation engine, Ray backend) with N virtual
users and a small fixed amount of work per user, so N=16 fits the benchmark's budget.

Peak memory is sampled over the whole process tree (driver, Ray, its workers). Every base-model
load appends its process id to a log (shared.model, OPPU_LOAD_LOG), so we can check the base
model is loaded once per worker process, never per user or per round.
"""

from __future__ import annotations

import collections
import os
import shutil
import threading
import time
from pathlib import Path

from shared.config import load_federated
from simulations.simulate import simulate

ROUNDS = 2
PER_USER = ("4 synthetic history items, personal LoRA 1 epoch (batch 4), 1 held-out query, "
            "methods OPPU, base adapter not federated")


class TreeMemory:
    """Max over time of the summed RSS of this process and all its descendants."""

    def __init__(self, every: float = 0.5) -> None:
        self.peak, self.every, self._stop = 0, every, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run(users: int, model: str, out: Path) -> dict:
    work = (out / "work" / f"scaling-{users}").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "loads.log"
    os.environ["OPPU_LOAD_LOG"] = str(log)  # inherited by Ray and its workers
    overrides = [
        'data.task="synthetic-tag"', 'data.source="synthetic"', f"data.users={users}", "data.base_users=2",
        "data.base_examples=8", "data.queries=1", "data.min_history=4", "data.max_history=4",
        'retrieval.store="memory"', "retrieval.k=1", 'methods=["OPPU"]',
        "personal_train.epochs=1", "personal_train.batch_size=4", "base_train.epochs=1", "base_train.batch_size=4",
        "privacy.federate_base_adapter=false", f"federation.rounds={ROUNDS}", "federation.fraction_train=1.0",
        "federation.min_clients=1", "federation.evaluate_every=0", "federation.personal_refresh_epochs=1",
        f'federation.client_cache="{out.resolve() / "work" / "client-cache"}"',
    ]
    if model:
        overrides.append(f'base_model.path="{model}"')
    spec = load_federated(None, overrides)
    start = time.perf_counter()
    with TreeMemory() as mem:
        simulate(spec, work / "run")
    seconds = time.perf_counter() - start
    pids = collections.Counter(log.read_text().split()) if log.exists() else collections.Counter()
    coordinator = pids.pop(str(os.getpid()), 0)  # the ServerApp runs in this process
    return {
        "users": users, "rounds": ROUNDS, "seconds": seconds, "peak_rss_bytes": mem.peak,
        "workers": len(pids), "loads": sum(pids.values()), "loads_per_worker_max": max(pids.values(), default=0),
        "coordinator_loads": coordinator,
        "sim_client_cpus": spec.federation.sim_client_cpus,
        "note": (f"`oppu simulate`, embedded model ({spec.experiment.base_model.quantization}), {ROUNDS} rounds, every "
                 f"user trains each round; per user: {PER_USER}. Base-model loads are counted "
                 "in each worker process; the coordinator's own (quantized export, base adapter) are apart."),
    }
