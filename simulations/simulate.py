"""`oppu simulate`: N virtual users in Flower's simulation engine (Ray backend), in one command.

The scenario only: each evaluated user gets a data directory in the run (history store, held-out
queries), laid out exactly like a real user's machine (client/userdir.py), so the unchanged
ClientApp serves them; the coordinator is the unchanged ServerApp logic. Afterwards the users'
predictions, which never left their directories, are scored here exactly as `oppu experiment`
scores them (simulations/experiment.py), next to the coordinator's per-round report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from coordinator.distribution import export_quantized_model
from coordinator.run import federation_run_dir
from shared import environment
from shared.config import FederatedSpec, dump_toml, to_run_config
from shared.data import load_dataset, write_predictions
from shared.fileio import atomic_write
from shared.privacy import RDPAccountant
from shared.tasks import get_task

from . import flower_internals
from .centralized import run_centralized
from .reports.run_outputs import write_outputs

log = logging.getLogger("oppu.simulate")

environment.apply()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


def prepare_users(spec: FederatedSpec, run_dir: Path) -> tuple[Any, list[str]]:
    """Write one data directory per evaluated user (skipped when a resumed run has them)."""
    dataset = load_dataset(spec.experiment.data)
    task = get_task(dataset.task)
    users = run_dir / "users"
    index = users / "index.json"
    if index.exists():
        return dataset, json.loads(index.read_text())
    names = []
    for u in dataset.eval_users:
        name = _safe(u.user_id)
        d = users / name
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / "user.json", json.dumps({"user_id": u.user_id, "task": dataset.task}))
        if spec.experiment.retrieval.store == "chroma":
            from client.store import ChromaHistoryStore  # chromadb: only for store = "chroma"

            with ChromaHistoryStore(d / "history", task.item_text) as store:
                store.add(u.history)
                if u.profile_text:
                    store.set_profile(u.profile_text)
        else:
            atomic_write(d / "history.json", json.dumps(
                [{"id": it.id, "fields": dict(it.fields), "time": it.time} for it in u.history]))
        atomic_write(d / "queries.json", json.dumps([{"id": q.id, "input": q.input, "target": q.target}
                                                      for q in u.queries]))
        names.append(name)
    atomic_write(index, json.dumps(names))
    return dataset, names


def prepare_only(spec: FederatedSpec, run_dir: Path | None) -> list[Path]:
    """The users' data directories of a deployment: one per SuperNode (node config `data-dir`)."""
    run_dir = (Path(run_dir) if run_dir else federation_run_dir(spec)).resolve()
    _, names = prepare_users(spec, run_dir)
    return [run_dir / "users" / n for n in names]


def _app_dir(run_dir: Path, run_config: dict[str, Any]) -> Path:
    """A minimal Flower app directory whose run-config defaults are this run's settings, so the
    simulation engine hands the same run-config to the ServerApp and to every ClientApp."""
    d = run_dir / "flower-app"
    d.mkdir(parents=True, exist_ok=True)
    nested: dict[str, Any] = {}
    for k, v in run_config.items():
        nested[f'"{k}"'] = v
    text = ('[project]\nname = "oppu"\nversion = "0.1.0"\n\n[tool.flwr.app]\npublisher = "oppu"\n\n'
            '[tool.flwr.app.components]\nserverapp = "coordinator.server_app:app"\n'
            'clientapp = "client.client_app:app"\n\n[tool.flwr.app.config]\n'
            + dump_toml(nested))
    atomic_write(d / "pyproject.toml", text)
    return d


def simulate(spec: FederatedSpec, run_dir: Path | None = None, *, verbose: bool = False) -> Path:
    """Run the federation over the evaluated users of `spec.experiment.data`; returns the run dir."""
    from flwr.app import Context, RecordDict

    # The apps load Flower (and, through the coordinator, torch) only when a simulation runs:
    # `oppu simulate --prepare-only` needs neither.
    from client.client_app import app as client_app
    from coordinator.server_app import app as server_app

    run_dir = (Path(run_dir) if run_dir else federation_run_dir(spec)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    f = spec.federation
    spec = dataclasses.replace(spec, federation=dataclasses.replace(f, run_dir=str(run_dir)))
    t0 = time.time()
    resumed = (run_dir / "checkpoint").exists()
    dataset, names = prepare_users(spec, run_dir)
    if len(names) < f.min_clients:
        raise ValueError(f"{len(names)} users but federation.min_clients={f.min_clients}; raise data.users")
    run_config = to_run_config(spec)
    app_dir = _app_dir(run_dir, run_config)
    run = flower_internals.new_run()
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    backend = ray_backend(f, verbose)
    log.info("simulating %d users for %d rounds in %s%s", len(names), f.rounds, run_dir,
             f" on the Ray cluster at {f.ray_address}" if f.ray_address else "")
    progress = _ProgressLines()
    logging.getLogger("oppu.coordinator").addHandler(progress)
    # The server's DP noise and Poisson participation come from shared/aggregation.py: secret
    # randomness, unless federation.sampling_seed asks for a reproducible simulation.
    try:
        flower_internals.run_simulation(num_supernodes=len(names), client_app=client_app, server_app=server_app,
                                        backend_config=backend, app_dir=str(app_dir), run=run,
                                        server_app_context=context, verbose=verbose)
    finally:
        logging.getLogger("oppu.coordinator").removeHandler(progress)
    seconds = time.time() - t0
    summary_file = run_dir / "federation.json"
    if not summary_file.exists():
        raise RuntimeError(f"the coordinator did not finish; see {run_dir / 'log.txt'}")
    write_results(spec, dataset, names, run_dir, seconds, resumed=resumed)
    return run_dir


def ray_backend(f: Any, verbose: bool) -> dict[str, Any]:
    """Flower's Ray backend settings: each virtual client asks for sim_client_cpus / _gpus, and
    Ray places it on any node with them free (one actor per slot, each loading the base model
    once: client.rounds.engine_for). With federation.ray_address the run joins that cluster
    (whose nodes bring their own cores and GPUs); without, it starts one on this machine's cores."""
    init: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": verbose, "include_dashboard": False}
    if f.ray_address:
        init["address"] = f.ray_address
    else:  # "local": a Ray of its own even where a cluster already runs on this machine (ray.init
        # would otherwise join that one, and refuse the num_cpus)
        init.update(address="local", num_cpus=os.cpu_count() or 1)
    return {"client_resources": {"num_cpus": f.sim_client_cpus, "num_gpus": f.sim_client_gpus},
            "init_args": init}


class _ProgressLines(logging.Handler):
    """Long runs show progress: the coordinator's milestones (initial adapter, each round, final
    evaluation) on the console with the elapsed time, whatever the console's log level."""

    MILESTONES = ("initial base adapter", "before round", "round ", "final evaluation")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.t0 = time.time()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith(self.MILESTONES):
            print(f"[{time.time() - self.t0:5.0f} s] {msg}", flush=True)


def write_results(spec: FederatedSpec, dataset: Any, names: list[str], run_dir: Path, seconds: float, *,
                  resumed: bool = False) -> None:
    """Score the users' predictions (read from their own directories) as `oppu experiment` does,
    add the centralized baseline when asked for, and write the run's tables, plots and REPORT.md."""
    # torch (shared.engine, through simulations.experiment): not loaded by --prepare-only.
    from .experiment import UserResult, adoption_counts, render_results, score

    t0 = time.time()
    task = get_task(dataset.task)
    methods = spec.experiment.methods
    on_users = [m for m in methods if m != "centralized"]
    results, users = [], []
    for name, user in zip(names, dataset.eval_users):
        f = run_dir / "users" / name / "predictions.json"
        if not f.exists():
            log.warning("user %s has no predictions (evaluation failed there); left out of the table", name)
            continue
        preds = json.loads(f.read_text())
        if not all(m in preds for m in on_users):
            continue
        selection = {}  # the client's adoption decision per augmentation, as the experiment records it
        for sel_file in (run_dir / "users" / name / "federation").glob("selection-*.json"):
            selection[sel_file.stem.removeprefix("selection-")] = json.loads(sel_file.read_text())
        results.append(UserResult(user.user_id, len(user.history), {m: preds[m] for m in on_users},
                                  selection=selection))
        users.append(user)
    summary = json.loads((run_dir / "federation.json").read_text())
    data_info = {"task": dataset.task, "source": dataset.source, "notes": dataset.notes,
                 "eval_users": len(users), "queries": sum(len(u.queries) for u in users),
                 "users": {u.user_id: {"history": len(u.history), "level": dataset.levels.get(u.user_id)}
                           for u in dataset.eval_users}}
    text = ""
    if results:
        if "centralized" in methods:
            central = centralized_baseline(spec, task, users, run_dir)
            for r in results:
                r.predictions["centralized"] = central.predictions[r.user_id]
                r.train["centralized"] = central.train
        metrics = score(task, methods, users, results, base_users=dataset.base_users)
        metrics["adoption"] = adoption_counts(methods, results)
        for m in methods:  # all users' answers per method, as `oppu experiment` writes them
            write_predictions(run_dir / "predictions" / f"{_safe(m)}.json", dataset.task,
                              {qid: a for r in results for qid, a in r.predictions[m].items()})
        metrics["federation"] = {"rounds": len(summary["rounds"]), "status": summary["status"],
                                 "epsilon": summary["epsilon"], "delta": summary["delta"]}
        seconds += time.time() - t0  # the centralized baseline counts too
        write_outputs(run_dir, "simulate", metrics, data_info, summary, privacy_spent(spec, summary, run_dir), seconds,
                      resumed=resumed)
        text = render_results(metrics, data_info)
    report = (run_dir / "report.md").read_text()
    atomic_write(run_dir / "results.md", report + "\n" + text + f"\nWall time: {seconds:.0f} s\n"
                 f"Report with plots: {run_dir / 'REPORT.md'}\n")


def centralized_baseline(spec: FederatedSpec, task: Any, users: list[Any], run_dir: Path) -> Any:
    """The pooled-data adapter on top of the run's final global base adapter, in this process,
    on the same quantized model artifact the coordinator distributed."""
    from shared.engine import Engine  # torch: not loaded by --prepare-only

    e = spec.experiment
    model_dir = export_quantized_model(e.base_model)
    engine = Engine(dataclasses.replace(e.base_model, path=str(model_dir)), e.base_adapter, e.personal_adapter,
                    seed=e.personal_train.seed, decoding=e.decoding)
    engine.load_base(run_dir / "base_adapter")
    log.info("centralized baseline: one adapter on the pooled histories of %d users", len(users))
    return run_centralized(engine, task, e, users, run_dir / "centralized_adapter")


def privacy_spent(spec: FederatedSpec, summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """User-level (epsilon, delta) from the coordinator's accountant; record-level from each
    user's own DP-SGD ledger (DIR/federation/record-privacy-*.json)."""
    p = spec.experiment.privacy
    rounds = summary.get("rounds", [])
    how = summary.get("privacy", {})
    user_level = {"federate_base_adapter": p.federate_base_adapter, "noise_multiplier": p.noise_multiplier,
                  "clipping_norm": p.clipping_norm, "delta": p.delta if spec.dp else None,
                  "epsilon": summary.get("epsilon") if spec.dp else None,  # None: no noise, epsilon is infinite
                  # Under DP every round is released and accounted, whoever replied.
                  "rounds_accounted": len(rounds) if spec.dp else sum(1 for r in rounds if r.get("aggregated")),
                  "sample_rates": [r.get("sample_rate") for r in rounds],
                  **{k: how[k] for k in ("epsilon_rdp", "epsilon_prv", "mechanism", "accountant", "sampling",
                                         "sampling_seeded", "note", "secagg") if k in how},
                  # Simulated users report their numbers (losses, scores) to the harness: the
                  # researcher owns the data; a deployed client does not under DP (docs/federation.md).
                  "client_metrics": "reported by the simulated users (outside the DP guarantee; a deployed client "
                                    "sends none under DP unless federation.report_client_metrics)"}
    record = {"level": p.record_level, "noise_multiplier": p.record_noise_multiplier,
              "clipping_norm": p.record_clipping_norm, "epsilon_per_user": {}}
    for f in sorted((run_dir / "users").glob("*/federation/record-privacy-*.json")):
        acc = RDPAccountant.from_state_dict(json.loads(f.read_text()))
        eps = acc.epsilon(delta=p.delta)
        user = f.parent.parent.name
        record["epsilon_per_user"][user] = max(eps, record["epsilon_per_user"].get(user, 0.0))
    return {"user_level": user_level, "record_level": record}
