"""The cost model's coefficients (simulations/bench/costmodel.py), measured on this machine with
the simulate config's own data and prompts.

Two kinds of process run a simulation: the coordinator (all cores: initial base adapter,
centralized baseline) and W worker processes of sim_client_cpus threads each (the users' work).
The workers' coefficients are measured in W processes at once, as the simulation runs them, so
what they share (cores, memory bandwidth, and whatever else the machine is doing) is in them.

Each cost is a least-squares fit (non-negative) of measured wall times of the real calls (THE
training loop via Engine.train_personal, shared.selection.score, Engine.answer) against the work
the model counts for them (calls, steps or rows, padded or prompt tokens).

    python -m simulations.bench --sections costmodel      # the bench section (driver + W workers)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from client.userdir import UserDir
from coordinator.distribution import export_quantized_model
from shared.adapters import AdapterManifest
from shared.config import TrainSpec
from shared.data import load_dataset
from shared.personalize import Context, history_examples, prompt_for
from shared.retrieval import InMemoryHistoryStore, make_retriever
from shared.selection import _dense_weights, score
from shared.tasks import get_task
from simulations.simulate import prepare_users

from . import machine
from .costmodel import Coefficients, load_spec, predict, prompt_rows, train_work, workload

MEASURE_USERS = 2  # users of the config's data whose examples and prompts are timed


def fit(rows: Sequence[Sequence[float]], seconds: Sequence[float], names: Sequence[str]) -> dict[str, float]:
    """Non-negative least squares: seconds ~ sum(coef * x)."""
    import numpy as np
    from scipy.optimize import nnls

    coef, _ = nnls(np.asarray(rows, dtype=float), np.asarray(seconds, dtype=float))
    return {n: float(c) for n, c in zip(names, coef)}


def say(role: str, what: str) -> None:
    print(f"  [costmodel {role} {os.getpid()}] {what}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _spec(config: str | None):
    return load_spec(config, MEASURE_USERS, None, [])


def measure(config: str | None, role: str) -> dict[str, Any]:
    """One process's costs: role 'worker' (a simulated user's process) or 'driver'."""
    start = time.perf_counter()
    # Imported here on purpose: a worker's import of torch, transformers and the client is part
    # of the model load the simulation pays in each worker process (load_s).
    import torch

    from shared.engine import Engine

    if role == "worker":
        import client.rounds  # noqa: F401  (what a worker imports before its first message)
    spec = _spec(config)
    e = spec.experiment
    model_dir = export_quantized_model(e.base_model)
    engine = Engine(dataclasses.replace(e.base_model, path=str(model_dir)), e.base_adapter, e.personal_adapter,
                    seed=e.personal_train.seed)
    load_s = time.perf_counter() - start
    say(role, f"model loaded in {load_s:.1f} s; training")
    tok = engine.tokenizer
    dataset = load_dataset(e.data)
    task = get_task(dataset.task)
    plain, rag, queries = [], [], []
    for u in dataset.eval_users:
        store = InMemoryHistoryStore(task.item_text)
        store.add(u.history)
        ctx = Context(store, make_retriever(e.retrieval.retriever, task.item_text), e.retrieval)
        plain.append(history_examples(task, u.history, ctx, "plain"))
        rag.append(history_examples(task, u.history, ctx, "rag"))
        queries.append(([prompt_for(task, ctx, q.input, "plain") for q in u.queries],
                        [prompt_for(task, ctx, q.input, "rag") for q in u.queries]))

    def ts(batch: int, epochs: float) -> TrainSpec:
        return dataclasses.replace(e.personal_train, batch_size=batch, epochs=epochs)

    # -- training: per call, per step, per padded token
    # Steps of 1 to 8 examples, plain and retrieval prompts: enough spread to tell the per-step
    # cost from the per-token one. The coordinator only trains the initial base adapter and the
    # centralized baseline (batches of base_train/personal_train size): fewer runs there.
    runs = [(plain[0], ts(4, 2)), (plain[1][:4], ts(1, 1)), (plain[1] + rag[1], ts(8, 1))]
    if role == "worker":
        runs.append((rag[0], ts(4, 1)))
    engine.train_personal(plain[0][:2], ts(2, 1), progress=False)  # warm-up: first-call costs are start-up
    x, y = [], []
    for ex, t in runs:
        w = train_work(tok, ex, t)
        y.append(timed(lambda: engine.train_personal(ex, t, progress=False)))
        x.append([1.0, w.steps, w.padded_tokens])
    train = fit(x, y, ["call_s", "step_s", "token_s"])

    say(role, "answering")
    # -- answering (evaluation): per call, per row, per prompt token
    new = task.max_new_tokens
    engine.answer(queries[0][0][:1], max_new_tokens=new, personal=False)  # warm-up
    x, y = [], []
    for plain_q, rag_q in queries:
        for prompts, personal in ((plain_q[:1], False), (plain_q, True), (rag_q[:2], True), (rag_q, False))[
                : 4 if role == "worker" else 2]:
            if prompts:
                r = prompt_rows(tok, prompts)
                y.append(timed(lambda: engine.answer(prompts, max_new_tokens=new, personal=personal)))
                x.append([1.0, r.rows, r.tokens])
    answer = fit(x, y, ["call_s", "row_s", "token_s"])
    out: dict[str, Any] = {"role": role, "threads": torch.get_num_threads(), "load_s": load_s,
                           "train": train, "answer": answer, "samples": len(y)}
    if role == "driver":
        return out

    say(role, "validation scoring")
    # -- validation scoring inside a selection (4-bit base dequantized once per selection)
    cm = _dense_weights(engine)
    enter = timed(cm.__enter__)
    x, y = [], []
    try:
        for ex in (plain[0][-2:], rag[0][-2:], rag[1][-6:], plain[1][-1:]):
            r = prompt_rows(tok, [x_.prompt for x_ in ex])
            y.append(timed(lambda: score(engine, task, ex, personal=False, max_length=e.personal_train.max_length)))
            x.append([math.ceil(len(ex) / 4), r.rows, r.tokens])
    finally:
        leave = timed(lambda: cm.__exit__(None, None, None))
    out["score"] = fit(x, y, ["call_s", "row_s", "token_s"])
    out["selection_s"] = enter + leave
    out["user_task_s"] = user_task_seconds(spec, engine, task)
    return out


def user_task_seconds(spec: Any, engine: Any, task: Any) -> float:
    """Per user and message: open the user's history store, read it, close it, and write an
    adapter into the user's directory (what client.rounds does around the model's work)."""
    r = spec.experiment.retrieval
    with tempfile.TemporaryDirectory(prefix="oppu-costmodel-") as tmp:
        _, names = prepare_users(spec, Path(tmp))
        times = []
        for i, name in enumerate(names * 2):  # the first pass warms up (the store's first open in a process)
            user = UserDir(Path(tmp) / "users" / name)

            def task_() -> None:
                store = user.open_store(task, store=r.store, retriever=r.retriever)
                try:
                    store.items()
                finally:
                    close = getattr(store, "close", None)
                    if close is not None:
                        close()
                engine.save_base(user.path / "base_adapter", AdapterManifest(
                    role="base", base_model_hash=engine.model_hash, task=task.name,
                    peft_type=spec.experiment.base_adapter.peft_type))

            t = timed(task_)
            if i >= len(names):
                times.append(t)
        return sum(times) / len(times)


def driver_extras(config: str | None, cores: int) -> dict[str, float]:
    """Per-user data preparation (simulate.prepare_users) and Ray's start and stop."""
    import ray

    spec = _spec(config)
    with tempfile.TemporaryDirectory(prefix="oppu-costmodel-") as tmp:
        t = timed(lambda: prepare_users(spec, Path(tmp)))
    prepare_user_s = t / MEASURE_USERS

    def ray_start() -> None:
        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
        ray.shutdown()

    return {"prepare_user_s": prepare_user_s, "ray_start_s": timed(ray_start)}


def run(config: str | None = None) -> dict[str, Any]:
    """The bench section: the coordinator's costs here, then W worker processes at once."""
    spec = load_spec(config, None, None, [])
    cores = os.cpu_count() or 1
    workers = max(1, int(cores // spec.federation.sim_client_cpus))
    threads = max(1, int(spec.federation.sim_client_cpus))
    print("  [costmodel] coordinator", file=sys.stderr, flush=True)
    load = os.getloadavg()
    driver = measure(config, "driver")
    extras = driver_extras(config, cores)
    print(f"  [costmodel] {workers} worker processes of {threads} thread(s) at once", file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # as Ray gives each actor its num_cpus
    cmd = [sys.executable, "-m", "simulations.bench.costcoeffs", "--role", "worker"]
    if config:
        cmd += ["--config", config]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(workers)]
    results = []
    for p in procs:
        out, _ = p.communicate()
        line = next((l for l in out.splitlines() if l.startswith("COSTCOEFFS_JSON ")), None)
        if p.returncode or line is None:
            raise RuntimeError(f"a cost-model worker measurement failed (exit {p.returncode}); its output is above")
        results.append(json.loads(line[len("COSTCOEFFS_JSON "):]))
    load = [round(a, 2) for a in (*load, *os.getloadavg())]
    out = {"worker": mean_costs(results), "driver": driver, **extras, "concurrent_workers": workers,
           "config": config or "simulations/configs/simulate.toml",
           "machine": {**machine.describe(), "load_average": load}}
    pred = predict(workload(spec, cores=cores), Coefficients.from_dict(out))
    out["prediction"] = {"users": spec.experiment.data.users, "rounds": spec.federation.rounds,
                         "phases": pred.phases, "total": pred.total}
    return out


def mean_costs(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' costs averaged over the processes measured at once."""
    out: dict[str, Any] = {"role": "worker", "threads": results[0]["threads"], "processes": len(results)}
    for key in ("load_s", "selection_s", "user_task_s"):
        out[key] = sum(r[key] for r in results) / len(results)
    for key in ("train", "answer", "score"):
        out[key] = {k: sum(r[key][k] for r in results) / len(results) for k in results[0][key]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.bench.costcoeffs")
    p.add_argument("--role", choices=["worker", "driver"], default="worker")
    p.add_argument("--config", help="simulate config whose data and prompts are timed")
    args = p.parse_args(argv)
    print("COSTCOEFFS_JSON " + json.dumps(measure(args.config, args.role)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
