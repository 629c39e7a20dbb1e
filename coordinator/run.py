"""The coordinator's run: prepare the artifacts and the base adapter, then rounds, checkpoints,
privacy accounting, evaluation and the reports (coordinator/server_app.py is only Flower glue).

run_dir/
  config.toml        the resolved FederatedSpec
  artifacts/         the initial base adapter (an artifact clients download once)
  checkpoint/        coordinator/checkpoint.py: written atomically after every round
  base_adapter/      the final global base adapter
  federation.json    per-round numbers (updates aggregated/rejected, losses, epsilon, bytes)
  report.md          the same as tables, and the final per-method scores reported by clients
  log.txt            the coordinator's log
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.adapters import AdapterManifest
from shared.aggregation import delta_of, noise_generator, release
from shared.config import METHODS, FederatedSpec, dump_federated_toml, federated_to_dict
from shared.data import load_dataset
from shared.fileio import atomic_write
from shared.model_manifest import read_or_make_manifest
from shared.personalize import population_base_examples
from shared.rundir import new_run_dir, run_log
from shared.protocol import (
    ARRAYS, CONFIG, EVALUATE, KIND_BASE_ADAPTER, KIND_MODEL, METRICS, NUM_QUERIES, RoundConfig, is_lora_b,
)
from shared.tasks import get_task

from . import checkpoint
from .cohorts import cohorts, personal_phase
from .report import privacy_summary, render_report, round_line
from .sampling import NodeNames, sample_round
from .secagg import secure_average
from .distribution import Artifact, Distributor, export_quantized_model
from .strategy import (
    Accounting, SampledGrid, aggregate_dp, align_metric_keys, bound_updates, build_strategy, exchanged,
    load_strategy_state, mean_metrics, mechanism, screen, strategy_state, train_config,
)

log = logging.getLogger("oppu.coordinator")

# Settings a resumed run may change; any other difference from the checkpoint is refused.
RESUMABLE_CHANGES = {("federation", "rounds"), ("federation", "round_timeout"), ("federation", "run_dir"),
                     ("federation", "client_cache"), ("federation", "sim_client_cpus"),
                     ("federation", "evaluate_every"), ("privacy", "epsilon_budget"), ("out_dir",)}


def federation_run_dir(spec: FederatedSpec) -> Path:
    """federation.run_dir when set (a resumed run names its directory), else a new one."""
    if spec.federation.run_dir:
        return Path(spec.federation.run_dir)
    return new_run_dir(spec.experiment.out_dir, f"federated-{spec.experiment.data.task}")


class Coordinator:
    def __init__(self, spec: FederatedSpec, run_dir: Path | None = None) -> None:
        self.spec = spec
        self.run_dir = Path(run_dir) if run_dir else federation_run_dir(spec)
        self.ckpt_dir = self.run_dir / "checkpoint"
        self.history: list[dict[str, Any]] = []
        self.start_round = 1
        self.status = "running"
        self.initial: dict[str, float] = {}

    # ------------------------------------------------------------------------------ the run

    def run(self, grid: Any) -> dict[str, Any]:
        with run_log(self.run_dir):  # the run log keeps INFO whatever the console shows
            self._setup()
            f = self.spec.federation
            if self.status == "running" and self.start_round == 1 and f.evaluate_every and not self.initial:
                self.initial = self._evaluate(grid, ("non-personalized",), 0)
                log.info("before round 1: %s", ", ".join(f"{k} {v:.4f}" for k, v in self.initial.items() if "/" in k))
            if self.status == "running":
                for rnd in range(self.start_round, f.rounds + 1):
                    if not self._round(grid, rnd):
                        break
                else:
                    self.status = "completed"
            final = self._evaluate(grid, self.spec.experiment.methods, f.rounds, final=True)
            last = self.history[-1] if self.history else None
            if f.evaluate_every and last is not None and not last.get("evaluate"):
                # The last round's evaluation is the final one (it is not run twice).
                last["evaluate"] = {k: v for k, v in final.items() if k.startswith("non-personalized/") or k == "users"}
            self._checkpoint(self.history[-1]["round"] if self.history else 0)
            self.engine.save_base(self.run_dir / "base_adapter", self._base_manifest())
            return self._report(final)

    # ------------------------------------------------------------------------------ setup

    def _setup(self) -> None:
        # Here, not at the top: shared.engine loads torch, and `oppu simulate --prepare-only` imports
        # this module (federation_run_dir) without needing a model.
        from shared.engine import Engine

        e, f = self.spec.experiment, self.spec.federation
        atomic_write(self.run_dir / "config.toml", dump_federated_toml(self.spec))
        self.dataset = load_dataset(e.data)  # the operator's data: base users, never evaluated
        self.task = get_task(self.dataset.task)
        model_dir = export_quantized_model(e.base_model)
        identity = read_or_make_manifest(model_dir)["model_hash"]
        self.model = Artifact.from_dir(model_dir, KIND_MODEL, identity)
        self.engine = Engine(dataclasses.replace(e.base_model, path=str(model_dir)), e.base_adapter,
                             e.personal_adapter, seed=e.personal_train.seed, decoding=e.decoding)
        log.info("base model artifact %s (%s, %.1f MB), hash %s", self.model.id[:12], e.base_model.quantization,
                 self.model.manifest.total_bytes / 1e6, self.engine.model_hash[:12])
        self.inner = build_strategy(self.spec)
        ckpt = checkpoint.load(self.ckpt_dir)
        init_dir = self.run_dir / "artifacts" / "base-adapter-init"
        if (init_dir / "oppu_adapter.json").exists():
            self.engine.load_base(init_dir)  # a restarted run keeps its initial adapter (FFA's A)
        else:
            self._train_initial_base()
            self.engine.save_base(init_dir, self._base_manifest(initial=True))
        self.base_artifact = Artifact.from_dir(init_dir, KIND_BASE_ADAPTER)
        accountant = None
        if ckpt is not None:
            self._check_resumable(ckpt.config)
            self.engine.load_base(ckpt.base_adapter_dir)
            load_strategy_state(self.inner, ckpt.strategy)
            self.history, accountant, self.initial = ckpt.history, ckpt.accountant, ckpt.initial
            self.start_round = ckpt.round + 1
            self.status = "running" if ckpt.status in ("running", "completed") else ckpt.status
            log.info("resuming from the checkpoint of round %d (next round %d)", ckpt.round, self.start_round)
        self.accounting = Accounting(self.spec, accountant)
        self.names = NodeNames(timeout=f.round_timeout)
        self.distributor = Distributor([self.model, self.base_artifact], chunk_bytes=int(f.chunk_mb * 2**20),
                                       timeout=f.round_timeout)

    def _train_initial_base(self) -> None:
        e = self.spec.experiment
        if self.spec.federation.base_init != "train" or not self.dataset.base_users:
            log.info("initial base adapter: untrained (federation.base_init=%s)", self.spec.federation.base_init)
            return
        examples = population_base_examples(self.task, e, self.dataset.base_users)
        r = self.engine.train_base(examples, e.base_train, progress=False)
        log.info("initial base adapter: %d examples from %d users who are never evaluated, loss %.3f, %.0f s",
                 len(examples), len(self.dataset.base_users), r.final_loss, r.seconds)

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        now = federated_to_dict(self.spec)
        # Settings added since the checkpoint was written count as their defaults.
        defaults = federated_to_dict(FederatedSpec())
        saved = {k: ({**defaults[k], **v} if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v)
                 for k, v in {**defaults, **saved}.items()}
        diffs = []
        for section in sorted(set(now) | set(saved)):
            a, b = now.get(section), saved.get(section)
            if isinstance(a, dict) and isinstance(b, dict):
                diffs += [f"{section}.{k}" for k in sorted(set(a) | set(b))
                          if a.get(k) != b.get(k) and (section, k) not in RESUMABLE_CHANGES]
            elif a != b and (section,) not in RESUMABLE_CHANGES:
                diffs.append(section)
        if diffs:
            raise ValueError(f"{self.ckpt_dir} was written with different settings ({', '.join(diffs[:5])}); "
                             "use the same configuration to resume, or a new federation.run_dir")

    def _base_manifest(self, initial: bool = False) -> AdapterManifest:
        return AdapterManifest(role="base", base_model_hash=self.engine.model_hash, task=self.task.name,
                               peft_type=self.spec.experiment.base_adapter.peft_type,
                               data={"rounds": len(self.history)}, train={"initial": initial},
                               privacy={"epsilon": self.accounting.epsilon() or 0.0} if not initial and self.spec.dp else {})

    # ------------------------------------------------------------------------------ rounds

    def _connected(self, grid: Any) -> list[int]:
        f = self.spec.federation
        deadline = time.time() + f.round_timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= f.min_clients:
                return nodes
            if time.time() > deadline:
                raise RuntimeError(f"only {len(nodes)} users connected after {f.round_timeout:.0f} s; "
                                   f"federation.min_clients={f.min_clients}")
            time.sleep(1.0)

    def _round_config(self, rnd: int, methods: tuple[str, ...], *, epsilon: float | None) -> RoundConfig:
        f, p = self.spec.federation, self.spec.experiment.privacy
        return RoundConfig(server_round=rnd, task=self.task.name, model=self.model.id,
                           base_adapter=self.base_artifact.id, federate=p.federate_base_adapter,
                           ffa_lora=f.ffa_lora, proximal_mu=f.proximal_mu if f.strategy == "fedprox" else 0.0,
                           # Baselines (the centralized one) run in the harness, never on a user's machine.
                           methods=",".join(m for m in methods if m in METHODS), epsilon=-1.0 if epsilon is None else epsilon,
                           delta=p.delta if epsilon is not None else 0.0)

    def _round(self, grid: Any, rnd: int) -> bool:
        """One round. Nothing derived from this round's updates leaves the coordinator before the
        checkpoint holding the new base adapter, the accountant that paid for it and the round
        number is durable: a coordinator killed at any point before that reruns the round (the
        unreleased aggregate is lost, never published), one killed after it resumes at the next."""
        f, e = self.spec.federation, self.spec.experiment
        t0 = time.time()
        nodes = self.names.order(grid, self._connected(grid))
        if self.accounting.would_exceed(sample_rate=f.fraction_train):
            log.warning("round %d: stopping, epsilon would reach %.3f > budget %.3f", rnd,
                        self.accounting.projected(sample_rate=f.fraction_train), e.privacy.epsilon_budget)
            self.status = "budget-exhausted"
            return False
        sample, q = sample_round(nodes, self.spec, rnd)
        dist = self.distributor.ensure(grid, sample) if sample else None
        ready = dist.ok(sample) if dist else []
        if sample and not ready:
            log.warning("round %d: no sampled user could receive the artifacts (%s)%s", rnd,
                        "; ".join(f"{n}: {r}" for n, r in list(dist.failed.items())[:3]),
                        "; the noise alone is released" if self.spec.dp else "; the round is skipped")
        state = exchanged(self.engine.base_state(), ffa_lora=f.ffa_lora)
        cfg = self._round_config(rnd, e.methods, epsilon=self.accounting.projected(sample_rate=q))
        if f.secagg:
            out = self._train_secure(grid, rnd, ready, state, cfg, population=len(nodes))
        else:
            out = self._train_plain(grid, rnd, ready, state, cfg, population=len(nodes))
        if out["new"] is not None:
            self._apply(out["new"])  # in memory only until the checkpoint below is durable
            self.accounting.record(out["event"])
        # Under DP with secret sampling, who took part stays out of the run's records: the
        # amplification by subsampling that the epsilon counts on assumes nobody learns it.
        secret = self.spec.dp and f.sampling_seed < 0
        failed = {**dict(dist.failed if dist else {}), **out["failed"]}
        entry = {
            "round": rnd, "connected": len(nodes), "sampled": len(sample), "sample_rate": q,
            "aggregated": out["aggregated"], "replied": out["replied"],
            "rejected": _keyed(out["rejected"], secret), "failed": _keyed(failed, secret),
            "clipped": out.get("clipped", 0),
            "train": out["train"], **({"personal": out["personal"]} if "personal" in out else {}),
            "epsilon": self.accounting.epsilon(),
            "delta": e.privacy.delta if self.spec.dp else None,
            "bytes_per_client": {"artifacts": sum(dist.sent.values()) / max(1, len(dist.sent)) if dist else 0.0,
                                 "base_adapter_down": out["down"], "base_adapter_up": out["up"]},
        }
        if not secret:
            entry["users"] = [self.names.label(n) for n in sample]
        report = self.accounting.report()
        if report is not None:
            entry["epsilon_rdp"], entry["epsilon_prv"] = report["epsilon_rdp"], report["epsilon_prv"]
        entry["seconds"] = time.time() - t0
        self.history.append(entry)
        self._checkpoint(rnd)  # durable: from here on the new adapter may leave
        if f.evaluate_every and rnd % f.evaluate_every == 0 and rnd < f.rounds:
            entry["evaluate"] = self._evaluate(grid, ("non-personalized",), rnd)
            entry["seconds"] = time.time() - t0
            self._checkpoint(rnd)
        log.info("%s", round_line(entry, f.rounds))
        return True

    def _noise_rng(self, rnd: int) -> Any:
        seed = self.spec.federation.sampling_seed
        return noise_generator(seed if seed >= 0 else None, rnd)

    def _train_plain(self, grid: Any, rnd: int, ready: list[int], state: dict[str, Any], cfg: RoundConfig, *,
                     population: int) -> dict[str, Any]:
        """Cohorts of simulated users get their personal adapters first (coordinator/cohorts.py);
        then Flower's strategy sends the round and, without DP, averages bounded updates; under DP
        the accepted updates go through THE DP-FedAvg round (strategy.aggregate_dp)."""
        from flwr.app import ArrayRecord, ConfigRecord

        f = self.spec.federation
        arrays = ArrayRecord({k: _array(v) for k, v in state.items()})
        groups = cohorts(self.spec, self.names, ready, cfg)
        personal, personal_numbers = (personal_phase(grid, self.names, groups, arrays, cfg, timeout=f.round_timeout)
                                      if groups else (set(), None))
        msgs = []
        for nodes, methods in (([n for n in ready if n not in personal], cfg.methods), (sorted(personal), "")):
            config = ConfigRecord(train_config(self.spec, dataclasses.replace(cfg, methods=methods).to_record()))
            msgs += list(self.inner.configure_train(rnd, arrays, config, SampledGrid(grid, nodes))) if nodes else []
        replies = list(grid.send_and_receive(msgs, timeout=f.round_timeout)) if msgs else []
        # Arrival order varies; the sums (and so a rerun's last bits) should not.
        replies.sort(key=lambda r: self.names.key(r.metadata.src_node_id))
        answered = {r.metadata.src_node_id for r in replies}
        screened = screen(replies, {k: v.shape for k, v in state.items()}, federate=cfg.federate, dp=self.spec.dp)
        aggregated, arrays_new, event, clipped = 0, None, None, 0
        train_metrics = mean_metrics([r.content[METRICS] for r in screened.accepted], "num-examples")
        if cfg.federate and self.spec.dp:
            result = aggregate_dp(screened.accepted, state, self.spec, population=population, rng=self._noise_rng(rnd))
            arrays_new, event, aggregated, clipped = result.state, result.event, result.contributions, result.clipped
        elif cfg.federate and screened.accepted:
            clipped = bound_updates(screened.accepted, state, max_norm=f.max_update_norm,
                                    max_weight_ratio=f.max_weight_ratio)
            # Flower refuses to aggregate replies whose metric keys differ (e.g. one user trained a
            # personal adapter for the first time this round, and reports its loss); our own
            # mean above kept every key, Flower gets the keys all replies share.
            align_metric_keys(screened.accepted)
            new, _ = self.inner.aggregate_train(rnd, screened.accepted)
            if new is not None:
                arrays_new = {k: a.numpy() for k, a in new.items()}
                aggregated = len(screened.accepted)
        up = sum(r.content[ARRAYS].count_bytes() for r in screened.accepted if ARRAYS in r.content.array_records)
        return {"new": arrays_new, "event": event, "replied": len(screened.accepted), "aggregated": aggregated,
                "rejected": screened.rejected, "clipped": clipped,
                "failed": {n: "no reply" for n in ready if n not in answered},
                "train": train_metrics, **({"personal": personal_numbers} if personal_numbers else {}),
                "down": arrays.count_bytes() if msgs else 0, "up": up / max(1, len(screened.accepted))}

    def _train_secure(self, grid: Any, rnd: int, ready: list[int], state: dict[str, Any],
                      cfg: RoundConfig, *, population: int) -> dict[str, Any]:
        """SecAgg+: only the sum is revealed. Each client clips its own update to C (the coordinator
        cannot see one to clip it); the sum then goes through THE DP-FedAvg release (fixed
        denominator, noise, accounting) of shared/aggregation.py."""
        config = train_config(self.spec, cfg.to_record())
        res = secure_average(grid, ready, state, config, server_round=rnd, timeout=self.spec.federation.round_timeout) \
            if len(ready) >= 2 else None
        out: dict[str, Any] = {"new": None, "event": None, "replied": res.aggregated if res else 0, "aggregated": 0,
                               "rejected": {}, "failed": {},
                               "train": mean_metrics(res.metrics, "num-examples") if res else {},
                               "down": sum(v.nbytes for v in state.values()) if res else 0,
                               "up": sum(v.nbytes for v in state.values()) if res and res.aggregated else 0}
        if len(ready) == 1:
            out["failed"] = {ready[0]: "SecAgg+ needs at least 2 users in a round; this update is not used"}
        for reason in (res.failures if res else []):
            log.warning("round %d: SecAgg+ failure: %s", rnd, reason)
        avg = res.average if res else None
        if avg is not None:
            bad = [k for k in state if k not in avg or avg[k].shape != state[k].shape or not np.isfinite(avg[k]).all()]
            if bad or set(avg) != set(state):
                out["rejected"] = {"aggregate": f"secure aggregate does not fit the base adapter (e.g. {(bad or ['keys'])[0]})"}
                avg = None
        elif ready and len(ready) >= 2:
            out["failed"] = {n: "SecAgg+ produced no aggregate" for n in ready}
        if not self.spec.dp:
            if avg is not None:
                out["new"], out["aggregated"] = avg, res.aggregated
            return out
        # The securely averaged new tensors of n users -> the sum of their (client-clipped) deltas.
        n = res.aggregated if avg is not None else 0
        delta_sum = ({k: v * n for k, v in delta_of(avg, state).items()} if n
                     else {k: np.zeros(v.shape) for k, v in state.items()})
        result = release(state, delta_sum, mechanism=mechanism(self.spec), population=population,
                         rng=self._noise_rng(rnd), contributions=n)
        out["new"], out["event"], out["aggregated"] = result.state, result.event, n
        return out

    def _apply(self, new: dict[str, Any]) -> None:
        import torch

        state = {k: v.clone() for k, v in self.engine.base_state().items()}
        dtype = next(iter(state.values())).dtype
        for k, a in new.items():
            if self.spec.federation.ffa_lora and not is_lora_b(k):
                continue
            state[k] = torch.from_numpy(a.copy()).to(dtype)
        self.engine.set_base_state(state)

    def _evaluate(self, grid: Any, methods: tuple[str, ...], rnd: int, *, final: bool = False) -> dict[str, float]:
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        nodes = self.names.order(grid, self._connected(grid))
        ready = self.distributor.ensure(grid, nodes).ok(nodes)
        state = exchanged(self.engine.base_state(), ffa_lora=self.spec.federation.ffa_lora)
        cfg = self._round_config(rnd, methods, epsilon=self.accounting.epsilon())
        content = RecordDict({ARRAYS: ArrayRecord({k: _array(v) for k, v in state.items()}),
                              CONFIG: ConfigRecord(cfg.to_record())})
        msgs = [Message(content, dst_node_id=n, message_type=EVALUATE) for n in ready]
        replies = sorted(grid.send_and_receive(msgs, timeout=self.spec.federation.round_timeout),
                         key=lambda r: self.names.key(r.metadata.src_node_id))
        ok = [r.content[METRICS] for r in replies if not r.has_error() and METRICS in r.content.metric_records]
        for r in replies:
            if r.has_error():
                log.warning("evaluation on node %s failed: %s", r.metadata.src_node_id, r.error.reason)
        out = mean_metrics(ok, NUM_QUERIES)
        out["users"] = float(sum(1 for r in ok if r.get(NUM_QUERIES, 0)))
        if final:
            log.info("final evaluation on %d users: %s", int(out["users"]),
                     ", ".join(f"{k}={v:.4f}" for k, v in out.items() if "/" in k))
        return out

    def _checkpoint(self, rnd: int) -> None:
        ckpt = checkpoint.Checkpoint(
            round=rnd, accountant=self.accounting.state_dict() if self.spec.dp else None, history=self.history,
            config=federated_to_dict(self.spec), status=self.status,
            artifacts={"model": self.model.id, "base_adapter": self.base_artifact.id},
            strategy=strategy_state(self.inner), initial=self.initial)
        checkpoint.save(self.ckpt_dir, ckpt, lambda d: self.engine.save_base(d, self._base_manifest()))

    # ------------------------------------------------------------------------------ reports

    def _privacy_summary(self) -> dict[str, Any]:
        return privacy_summary(self.spec, self.accounting)

    def _report(self, final: dict[str, float]) -> dict[str, Any]:
        summary = {
            "status": self.status, "task": self.task.name, "initial": self.initial, "rounds": self.history,
            "final": final, "epsilon": self.accounting.epsilon(),
            "delta": self.spec.experiment.privacy.delta if self.spec.dp else None,
            "privacy": self._privacy_summary(),
            "artifacts": {"model": self.model.id, "model_bytes": self.model.manifest.total_bytes,
                          "base_adapter": self.base_artifact.id,
                          "base_adapter_bytes": self.base_artifact.manifest.total_bytes,
                          "streamed_bytes_per_client": {str(n): b for n, b in self.distributor.bytes_total.items()}},
            "run_dir": str(self.run_dir),
        }
        atomic_write(self.run_dir / "federation.json", json.dumps(summary, indent=2))
        atomic_write(self.run_dir / "report.md", render_report(summary, self.spec))
        return summary


def _keyed(by_node: dict[Any, str], secret: bool) -> dict[str, str]:
    """Per-node reasons for the round log: by node id, or numbered when the sample is secret."""
    return {(f"#{i}" if secret else str(k)): v for i, (k, v) in enumerate(by_node.items(), 1)}


def _array(v: Any) -> Any:
    from flwr.app import Array

    return Array(v)
