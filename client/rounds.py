"""What a user's machine does in a federated round (client/client_app.py is only the Flower glue).

- inventory / artifact: report the cached artifact ids; receive, verify and cache chunks.
- train: take the global base adapter; train (first time) or refresh the personal adapters on the
  local history store and publish them on the user's disk, each recording the base adapter it
  was trained on (written to DIR/base_adapter first, where a daemon reads it); when the run
  federates the base adapter, train it locally (FedProx's proximal term, FFA-LoRA's frozen A)
  and return only the updated base-adapter tensors plus numbers.
- evaluate: answer this user's held-out queries (when the directory has any) for each method and
  return only the scores.

The base model is loaded once per process and kept in `RUNTIME.engines` (keyed by the model artifact and
the adapter settings); simulated users served by the same process share it and swap only their
personal adapters, which live in their own data directories between rounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from shared.adapters import TRAINED_ON, AdapterManifest, adapter_version, read_manifest
from shared.config import BaseModelSpec, FederatedSpec, from_run_config
from shared.dpsgd import DPSGD
from shared.fileio import atomic_write
from shared.model_source import cache_root
from shared.personalize import (METHOD_AUGMENTATION, PERSONAL_METHODS, Context, base_examples, ensure_profile,
                                history_examples, prompt_for)
from shared.privacy import RDPAccountant
from shared.protocol import ClientError, ProtocolError, RoundConfig, is_lora_b
from shared.retrieval import make_retriever
from shared.selection import train_and_select
from shared.tasks import get_task

from .artifacts import ArtifactCache
from .personal import PersonalAdapters, new_manifest
from .settings import ARTIFACTS_DIR, DEFAULT_ARTIFACT_QUOTA_MB
from .userdir import UserDir

log = logging.getLogger("oppu.client")

class NodeRuntime:
    """What a client process keeps between rounds: parsed run configs, and one Engine per model
    artifact and adapter settings (the base model is loaded once per process, not per round or
    per simulated user). It lives as long as the process that serves the ClientApp; tests start
    a fresh one."""

    def __init__(self) -> None:
        self.specs: dict[Any, FederatedSpec] = {}
        self.engines: dict[Any, Any] = {}
        self.base_loaded: dict[Any, str] = {}  # engine -> base-adapter artifact id in its base slot (FFA-LoRA)
        self.lock = threading.Lock()


RUNTIME = NodeRuntime()


# ----------------------------------------------------------------------------- node settings


@dataclass(frozen=True)
class Node:
    """Where this client's data and cache are (node config, or the simulated user's slot)."""

    spec: FederatedSpec
    user: UserDir
    cache: ArtifactCache
    simulated: bool = False  # a simulated user of `oppu simulate` (Flower's partition-id), not a deployed client
    allow_metrics: bool = True  # node config `report-metrics`: the user's own say on sending numbers


def spec_from_run_config(run_config: Mapping[str, Any]) -> FederatedSpec:
    key = tuple(sorted((str(k), repr(v)) for k, v in dict(run_config).items()))
    with RUNTIME.lock:
        if key not in RUNTIME.specs:
            RUNTIME.specs[key] = from_run_config(run_config)
        return RUNTIME.specs[key]


def partition_of(node_config: Mapping[str, Any]) -> int | None:
    """The simulated user this node plays (Flower's `partition-id`), or None for a deployed
    client, which names its own data directory (`data-dir` wins when both are given)."""
    if "data-dir" in node_config or "partition-id" not in node_config:
        return None
    return int(node_config["partition-id"])


def node_from(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> Node:
    """Deployment: node config `data-dir`, and the client's own artifact cache and quota (node config
    `cache-dir`, `artifact-quota-mb`, which the daemon sets from its settings; defaults DIR/artifacts
    and DaemonSpec's quota): the coordinator's run config never decides a deployed client's paths or
    limits. Simulation: the run directory's users/index.json lists the virtual users;
    `partition-id` picks one, and the researcher's run config names the shared cache."""
    spec = spec_from_run_config(run_config)
    pid = partition_of(node_config)
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"]))
    elif pid is not None and spec.federation.run_dir:
        data_dir = simulated_user_dir(spec, pid)
    else:
        raise ClientError("this SuperNode has no user data: start it with --node-config \"data-dir='DIR'\"")
    user = UserDir(data_dir)
    if "cache-dir" in node_config:
        cache = Path(str(node_config["cache-dir"]))
    elif pid is None:  # a deployed client
        cache = user.path / ARTIFACTS_DIR
    elif spec.federation.client_cache:
        cache = Path(spec.federation.client_cache)
    else:
        cache = cache_root(spec.experiment.base_model) / "client-artifacts"
    quota = _quota_bytes(node_config, deployed=pid is None)
    allow = str(node_config.get("report-metrics", "true")).strip().lower() not in ("false", "0", "no", "off")
    return Node(spec, user, ArtifactCache(cache, quota_bytes=quota), simulated=pid is not None, allow_metrics=allow)


def simulated_user_dir(spec: FederatedSpec, pid: int) -> Path:
    """The data directory of simulated user `pid` (its place in the run's users/index.json)."""
    index = Path(spec.federation.run_dir) / "users" / "index.json"
    try:
        names = json.loads(index.read_text())
    except FileNotFoundError:
        raise ClientError("the run directory has no users/index.json: simulated users are prepared by `oppu simulate`") from None
    if not 0 <= pid < len(names):
        raise ClientError(f"partition-id {pid} but only {len(names)} simulated users were prepared")
    return index.parent / names[pid]


def _quota_bytes(node_config: Mapping[str, Any], *, deployed: bool) -> int | None:
    """Node config `artifact-quota-mb` in bytes; a deployed client without it gets the daemon's default,
    a simulated user none (the researcher's machine, the researcher's cache)."""
    if "artifact-quota-mb" not in node_config:
        return int(DEFAULT_ARTIFACT_QUOTA_MB * 2**20) if deployed else None
    value = node_config["artifact-quota-mb"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ClientError(f"node config artifact-quota-mb={value!r} must be a positive number of MiB "
                          "(daemon.artifact_quota_mb)")
    return int(value * 2**20)


def reply_metrics(node: Node, metrics: Mapping[str, float]) -> dict[str, float]:
    """The numbers a train or evaluate reply may carry. Under DP a deployed client sends none
    (losses, example and history counts, scores are per-user and outside the DP guarantee) unless
    the operator opted in (`federation.report_client_metrics`) and the user's node config does
    not refuse (`report-metrics = false`). Simulated users always send them: the researcher owns
    the data, and the run's report says so. Without DP the numbers are sent (the update itself
    goes in the clear then): docs/federation.md lists each message's contents."""
    if not node.spec.dp or node.simulated or (node.spec.federation.report_client_metrics and node.allow_metrics):
        return dict(metrics)
    return {}


# ----------------------------------------------------------------------------- the model


def engine_for(node: Node, model_id: str) -> Any:
    """This process's Engine for the model artifact (loaded once, then reused every round)."""
    e = node.spec.experiment
    key = (model_id, e.base_model, e.base_adapter, e.personal_adapter, e.personal_train.seed)
    with RUNTIME.lock:
        if key not in RUNTIME.engines:
            from shared.engine import Engine  # torch: a round's inventory and artifact messages need no model

            path = node.cache.path(model_id)
            spec: BaseModelSpec = dataclasses.replace(e.base_model, path=str(path))
            t0 = time.perf_counter()
            RUNTIME.engines[key] = Engine(spec, e.base_adapter, e.personal_adapter, seed=e.personal_train.seed,
                                          decoding=e.decoding)
            log.info("base model %s loaded in %.1f s (once per process)", model_id[:12], time.perf_counter() - t0)
        return RUNTIME.engines[key]


def set_global_base(engine: Any, node: Node, cfg: RoundConfig, arrays: Mapping[str, np.ndarray]) -> None:
    """Put the coordinator's base adapter into the base slot (FFA-LoRA: its B over the shared A)."""
    import torch

    with engine.lock:
        if cfg.ffa_lora:
            if RUNTIME.base_loaded.get(engine) != cfg.base_adapter:
                engine.load_base(node.cache.path(cfg.base_adapter))
                RUNTIME.base_loaded[engine] = cfg.base_adapter
            state = {k: v.clone() for k, v in engine.base_state().items()}
            unknown = sorted(set(arrays) - {k for k in state if is_lora_b(k)})
            if unknown:
                raise ClientError(f"FFA-LoRA round carries non-B tensors, e.g. {unknown[0]}")
        else:
            state = {}
            RUNTIME.base_loaded.pop(engine, None)
        dtype = next(iter(engine.base_state().values())).dtype
        for k, v in arrays.items():
            state[k] = torch.from_numpy(np.array(v, copy=True)).to(dtype)
        try:  # checks keys, shapes and finiteness before changing anything
            engine.set_base_state(state)
        except ValueError as e:
            raise ProtocolError(f"the coordinator's base adapter does not fit: {e}") from None


# ----------------------------------------------------------------------------- handlers


def inventory(node: Node) -> list[str]:
    return node.cache.held()


def task_for(node: Node, cfg: RoundConfig) -> Any:
    mine = node.user.task_name()
    if mine and mine != cfg.task:
        raise ClientError(f"this user's data is for task {mine!r}, the run is {cfg.task!r}")
    return get_task(cfg.task)


def context_for(node: Node, task: Any, store: Any) -> Any:
    r = node.spec.experiment.retrieval
    profile = store.get_profile() or node.user.cached_profile()
    return Context(store, make_retriever(r.retriever, task.item_text), r, profile=profile)


def augmentations(methods: list[str]) -> list[str]:
    return sorted({METHOD_AUGMENTATION[m] for m in methods if m in PERSONAL_METHODS})


def train(node: Node, cfg: RoundConfig, arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, dict[str, float]]:
    """One train round on this user's machine. Returns (updated base adapter or None, numbers)."""
    t0 = time.perf_counter()
    engine = engine_for(node, cfg.model)
    task = task_for(node, cfg)
    with history_store(node, task) as store:
        history = store.items()
        ctx = context_for(node, task, store)
        metrics: dict[str, float] = {"history-items": float(len(history))}
        with engine.lock:
            set_global_base(engine, node, cfg, arrays)
            # (a) Personal adapters, stacked on the global base adapter, kept on this disk.
            for aug in augmentations(cfg.method_list):
                loss = personalize(engine, node, task, ctx, history, aug, cfg)
                if loss is not None:
                    metrics[f"personal-{aug}-loss"] = loss
            # (b) The base adapter's local update: the only tensors that may leave.
            update = None
            if cfg.federate:
                examples = base_examples(task, ctx, history, rng=random.Random(node.spec.federation.seed + cfg.server_round))
                dp = record_dp(node, "base", node.spec.federation.local_train)
                result = engine.train_base(examples, node.spec.federation.local_train, freeze_lora_a=cfg.ffa_lora,
                                           proximal_mu=cfg.proximal_mu, dp_sgd=dp, progress=False)
                if dp:
                    metrics["record-epsilon-base"] = account_record_dp(node, "base", dp)["record_epsilon"]
                state = engine.base_state()
                update = {k: state[k].detach().float().cpu().numpy() for k in arrays}
                metrics.update({"base-loss": result.final_loss, "base-steps": float(result.steps)})
                metrics["num-examples"] = float(len(examples))
            else:
                metrics["num-examples"] = float(len(history))
    node.user.record_round(epsilon=cfg.epsilon if cfg.epsilon >= 0 else None,
                           delta=cfg.delta if cfg.epsilon >= 0 else None)
    metrics["seconds"] = time.perf_counter() - t0
    return update, metrics


@contextlib.contextmanager
def history_store(node: Node, task: Any) -> Iterator[Any]:
    """This user's history for a round (client.userdir: a daemon's snapshot, or a simulated user's
    store), closed however the round ends: a Chroma store has one owner, and a failed round must
    not leave this process holding it."""
    store = node.user.open_store(task, store=node.spec.experiment.retrieval.store,
                                 retriever=node.spec.experiment.retrieval.retriever)
    try:
        yield store
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class PersonalPlan:
    """What a round does for one user's personal adapter of one augmentation."""

    examples: list[Any]  # the user's history as training examples, in time order
    train: Any  # TrainSpec: the experiment's, or personal_refresh_epochs of it for a refresh
    refresh: Any = None  # the published adapter (client.personal.Published) training continues from
    dp: Any = None  # DPSGD when privacy.record_level covers the personal adapter


def plan_personal(engine: Any, node: Node, task: Any, ctx: Any, history: list[Any], aug: str) -> PersonalPlan | None:
    """Train this user's personal adapter (first time), refresh the published one, or keep it as
    it is (None: personal_refresh_epochs = 0 and one is published)."""
    spec = node.spec.experiment
    if aug == "pag":
        ensure_profile(engine, task, ctx, history, seed=node.spec.experiment.data.seed, keep=node.user.cache_profile)
    examples = history_examples(task, history, ctx, aug)
    published, problems = PersonalAdapters(node.user.personal_root(aug)).resolve(base_model_hash=engine.model_hash)
    for p in problems:
        log.warning("personal adapter: %s", p)
    usable = (published is not None and published.manifest.task == task.name
              and published.manifest.peft_type == spec.personal_adapter.peft_type)
    refresh = node.spec.federation.personal_refresh_epochs
    if usable and refresh == 0:
        return None  # trained once; kept as is
    train_spec = dataclasses.replace(spec.personal_train, epochs=refresh) if usable else spec.personal_train
    return PersonalPlan(examples, train_spec, published if usable else None, record_dp(node, "personal", train_spec))


def personalize(engine: Any, node: Node, task: Any, ctx: Any, history: list[Any], aug: str,
                cfg: RoundConfig) -> float | None:
    """Train this user's personal adapter (first time) or refresh the published one, on the
    round's base adapter (in the engine's base slot); publish it, recording that base adapter."""
    plan = plan_personal(engine, node, task, ctx, history, aug)
    return None if plan is None else train_alone(engine, node, task, history, aug, cfg, plan)


def train_alone(engine: Any, node: Node, task: Any, history: list[Any], aug: str, cfg: RoundConfig,
                plan: PersonalPlan) -> float | None:
    """One user's planned personal training, by itself in the personal slot; kept by keep_personal."""
    if plan.refresh is not None:
        engine.load_personal(plan.refresh.path)
    tr, sel = train_and_select(engine, task, plan.examples, plan.train, node.spec.experiment.selection,
                               fresh=plan.refresh is None, progress=False, **({"dp_sgd": plan.dp} if plan.dp else {}))
    return keep_personal(engine, node, task, history, aug, cfg, plan, tr, sel)


def keep_personal(engine: Any, node: Node, task: Any, history: list[Any], aug: str, cfg: RoundConfig,
                  plan: PersonalPlan, tr: Any, sel: Any) -> float | None:
    """After a user's personal training (the personal slot holds the adopted adapter): account its
    DP-SGD, record the selection, publish the adopted adapter. Returns the final training loss."""
    privacy = account_record_dp(node, f"personal-{aug}", plan.dp)
    log.info("personal adapter (%s): %s", aug, sel.summary())
    atomic_write(_selection_file(node, aug), json.dumps({"base_model_hash": engine.model_hash, "task": task.name,
                                                         **sel.to_dict()}, indent=2))
    if sel.adopted:
        # The base it was trained on goes to disk first: a daemon never sees this adapter without
        # it, and checks the version recorded here against the base adapter answering (client.host).
        trained_on = save_round_base(engine, node, task, cfg)
        manifest = new_manifest(base_model_hash=engine.model_hash, task=task.name,
                                peft_type=node.spec.experiment.personal_adapter.peft_type,
                                data={"history_items": len(history), "examples": sel.train_items,
                                      "validation_items": sel.validation_items},
                                train={"steps": tr.steps, "final_loss": tr.final_loss, "augmentation": aug,
                                       "refreshed": plan.refresh is not None, "selection": sel.summary(),
                                       TRAINED_ON: trained_on}, privacy=privacy)
        PersonalAdapters(node.user.personal_root(aug)).publish(lambda target: engine.save_personal(target, manifest))
    return tr.final_loss if tr.losses else None


def save_round_base(engine: Any, node: Node, task: Any, cfg: RoundConfig) -> str:
    """Write the round's base adapter (the engine's base slot) to DIR/base_adapter, where a daemon
    answers with it; returns its version (shared.adapters.adapter_version)."""
    target = engine.save_base(node.user.path / "base_adapter", AdapterManifest(
        role="base", base_model_hash=engine.model_hash, task=task.name,
        peft_type=node.spec.experiment.base_adapter.peft_type, train={"round": cfg.server_round}))
    return adapter_version(read_manifest(target))


def _selection_file(node: Node, aug: str) -> Path:
    return node.user.path / "federation" / f"selection-{aug}.json"


def _not_adopted(node: Node, engine: Any, task: Any, aug: str) -> bool:
    """The last selection for this augmentation, model and task kept no personal adapter."""
    try:
        record = json.loads(_selection_file(node, aug).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("adopted") is False
            and record.get("base_model_hash") == engine.model_hash and record.get("task") == task.name)


def record_dp(node: Node, what: str, train: Any) -> Any:
    """A DP-SGD setting for this training when privacy.record_level covers `what`, else None."""
    p = node.spec.experiment.privacy
    if p.record_level not in (what, "both"):
        return None
    return DPSGD(noise_multiplier=p.record_noise_multiplier, max_grad_norm=p.record_clipping_norm,
                 expected_batch_size=train.batch_size, seed=secrets.randbits(63))  # sampling must be secret


def account_record_dp(node: Node, what: str, dp: Any) -> dict[str, float]:
    """Compose a DP-SGD run into this user's ledger for `what` (kept in DIR/federation/)."""
    if dp is None:
        return {}
    f = node.user.path / "federation" / f"record-privacy-{what}.json"
    acc = RDPAccountant.from_state_dict(json.loads(f.read_text())) if f.is_file() else RDPAccountant()
    dp.account(acc)
    atomic_write(f, json.dumps(acc.state_dict()))
    delta = node.spec.experiment.privacy.delta
    return {"record_epsilon": acc.epsilon(delta=delta), "record_delta": delta}


def evaluate(node: Node, cfg: RoundConfig, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Score this user's held-out queries per method; predictions stay in the user's directory."""
    engine = engine_for(node, cfg.model)
    task = task_for(node, cfg)
    queries = node.user.queries()
    with engine.lock:
        set_global_base(engine, node, cfg, arrays)
        save_round_base(engine, node, task, cfg)
        metrics: dict[str, float] = {"num-queries": float(len(queries))}
        if not queries:
            return metrics
        with history_store(node, task) as store:
            history = store.items()
            ctx = context_for(node, task, store)
            golds = [q.target for q in queries]
            predictions: dict[str, dict[str, str]] = {}
            for method in cfg.method_list:
                aug = METHOD_AUGMENTATION[method]
                if aug == "pag":
                    ensure_profile(engine, task, ctx, history, seed=node.spec.experiment.data.seed,
                                   keep=node.user.cache_profile)
                prompts = [prompt_for(task, ctx, q.input, aug) for q in queries]
                personal = method in PERSONAL_METHODS
                if personal:
                    personal = load_or_train_personal(engine, node, task, ctx, history, aug, cfg)
                answers = engine.answer(prompts, max_new_tokens=engine.answer_tokens(task, history), personal=personal,
                                        task=task)
                preds = [task.parse_output(a) for a in answers]
                predictions[method] = {q.id: p for q, p in zip(queries, preds)}
                for name, value in task.score(preds, golds).items():
                    metrics[f"{method}/{name}"] = float(value)
        node.user.write_predictions(predictions)
    return metrics


def load_or_train_personal(engine: Any, node: Node, task: Any, ctx: Any, history: list[Any], aug: str,
                           cfg: RoundConfig) -> bool:
    """Put this user's adopted personal adapter in the slot; False when none was adopted
    (shared.selection), and the method then answers as its non-personal counterpart."""
    published, _ = PersonalAdapters(node.user.personal_root(aug)).resolve(base_model_hash=engine.model_hash)
    if published is None or published.manifest.task != task.name:
        if _not_adopted(node, engine, task, aug):
            return False
        personalize(engine, node, task, ctx, history, aug, cfg)  # a user never sampled for training
        published, _ = PersonalAdapters(node.user.personal_root(aug)).resolve(base_model_hash=engine.model_hash)
        if published is None:
            return False
    engine.load_personal(published.path)
    return True
