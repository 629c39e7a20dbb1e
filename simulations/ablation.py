"""`oppu ablate privacy`: utility, (epsilon, delta) and membership-inference AUC over a grid of
noise multiplier, clipping norm, clients per round and population size, with base-adapter
federation on or off and record-level DP-SGD on or off.

Each cell runs the federation's own pieces in one process, without Flower's messaging (per-cell
cost matters; `oppu simulate` is the Flower path): each round's participants are drawn by THE
mechanism's Poisson participation (shared.aggregation.participants, q = m/N, seeded: see
`sampling_seed`), train the base adapter with the client's function
(shared.engine.Engine.train_base, as a client does, optionally with DP-SGD), and their updates go through THE
DP-FedAvg round the coordinator runs (shared.aggregation.dp_fedavg_round: clipping to C, the
fixed denominator q·N, noise z·C/(q·N)); every round is accounted by the coordinator's ledger
(coordinator.strategy.Accounting: the smaller of the RDP and PRV epsilons). Then:

- utility: the final shared base adapter's score on the population's held-out queries;
- attack: loss-threshold membership inference (simulations/membership.py) against the shared
  base adapter; members are the history records of users sampled at least once, non-members the
  records of `holdout_users` users of the same selection who never take part;
- reference: the same attack against unprotected personal adapters (their owners' records vs
  the hold-out records), which is what DP on the shared adapter is compared with.

run_dir/: config.toml, run.json, metrics.json (cells, reference), metrics.md, plots/tradeoff.png,
REPORT.md, log.txt.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.report import SEEDED_NOTE
from coordinator.strategy import Accounting, exchanged
from shared.aggregation import Mechanism, dp_fedavg_round, noise_generator, participants
from shared.config import FederatedSpec
from shared.data import load_dataset
from shared.dpsgd import DPSGD
from shared.engine import Engine
from shared.fileio import atomic_write
from shared.model_source import cache_root, resolve_model_dir
from shared.personalize import Context, base_examples, history_examples, population_base_examples, prompt_for
from shared.privacy import RDPAccountant
from shared.retrieval import InMemoryHistoryStore, make_retriever
from shared.rundir import new_run_dir, run_log
from shared.tasks import get_task

from .ablation_spec import AblationSpec, dump_ablation_toml, load_ablation
from .membership import attack, balanced, calibrated_auc
from .reports.ablation_page import write_ablation_outputs

__all__ = ["cells", "load_ablation", "run_ablation"]

log = logging.getLogger("oppu.ablation")
AXES = ("noise_multiplier", "clipping_norm", "clients_per_round", "population", "federate_base_adapter", "record_dp")
_GRID_FIELDS = ("noise_multipliers", "clipping_norms", "clients_per_round", "populations", "federate_base_adapter",
                "record_dp")


def cells(spec: AblationSpec) -> list[dict[str, Any]]:
    """The grid's cells (settings only), reference cell first, without duplicates."""
    g = spec.grid
    values = [list(getattr(g, f)) for f in _GRID_FIELDS]
    if g.layout == "full":
        combos = list(itertools.product(*values))
    else:
        base = tuple(v[0] for v in values)
        combos = [base]
        for i, vs in enumerate(values):
            for v in vs[1:]:
                combos.append(base[:i] + (v,) + base[i + 1:])
    out, seen = [], set()
    for combo in combos:
        cell = dict(zip(AXES, combo))
        if not cell["federate_base_adapter"]:  # nothing is shared: noise and clipping do not apply
            cell.update(noise_multiplier=0.0, record_dp=False)
        key = tuple(cell.values())
        if key in seen:
            continue
        seen.add(key)
        cell["id"] = len(out)
        cell["small_model"] = bool(g.small_model_min_population and cell["population"] >= g.small_model_min_population)
        out.append(cell)
    return out


def cell_spec(spec: AblationSpec, cell: dict[str, Any]) -> FederatedSpec:
    """The federated-run settings of one cell (what the accountant and the clients read)."""
    e, f = spec.run.experiment, spec.run.federation
    privacy = dataclasses.replace(e.privacy, federate_base_adapter=cell["federate_base_adapter"],
                                  noise_multiplier=cell["noise_multiplier"], clipping_norm=cell["clipping_norm"],
                                  record_level="base" if cell["record_dp"] else "none", epsilon_budget=0.0)
    return FederatedSpec(dataclasses.replace(e, privacy=privacy), dataclasses.replace(f, rounds=spec.grid.rounds))


class _Model:
    """One engine per model (full or small), its initial base adapter, reused by every cell."""

    def __init__(self, spec: AblationSpec, base_model: Any, task: Any, base_users: list[Any]) -> None:
        e = spec.run.experiment
        self.engine = Engine(base_model, e.base_adapter, e.personal_adapter, seed=e.personal_train.seed,
                             decoding=e.decoding)
        if spec.run.federation.base_init == "train" and base_users:
            self.engine.train_base(population_base_examples(task, e, base_users), e.base_train, progress=False)
        self.initial = {k: v.detach().clone() for k, v in self.engine.base_state().items()}


def run_ablation(spec: AblationSpec, run_dir: Path | None = None, *, progress: bool = True) -> Path:
    from tqdm.auto import tqdm

    g, e = spec.grid, spec.run.experiment
    run_dir = Path(run_dir) if run_dir else new_run_dir(e.out_dir, f"ablate-privacy-{e.data.task}")
    t0 = time.time()
    with run_log(run_dir):
        atomic_write(run_dir / "config.toml", dump_ablation_toml(spec))
        needed = max(g.populations) + g.holdout_users
        data = dataclasses.replace(e.data, users=needed)
        dataset = load_dataset(data)
        task = get_task(dataset.task)
        if len(dataset.eval_users) < needed:
            raise ValueError(f"the grid needs {needed} users (largest population {max(g.populations)} + "
                             f"{g.holdout_users} hold-out) but data.select found {len(dataset.eval_users)}; "
                             "lower data.min_history or the populations")
        # A seeded shuffle before the split: data.select orders users (e.g. by history size), and a
        # hold-out taken from the tail would differ from the members in kind, which the attack would
        # pick up as "membership" even where nothing is shared.
        chosen = random.Random(g.seed).sample(dataset.eval_users, needed)
        population_pool, holdout = chosen[: max(g.populations)], chosen[max(g.populations):]
        grid = cells(spec)
        metrics_base = {"task": dataset.task, "utility_metric": task.metric_names[0], "source": dataset.source,
                        "notes": dataset.notes, "small_model": _small_model_note(spec, grid),
                        "sampling_seed": sampling_seed(spec), "sampling_note": SEEDED_NOTE}
        models: dict[bool, _Model] = {}
        results = []
        for cell in tqdm(grid, desc="ablation cells", disable=not progress, unit="cell"):
            small = cell["small_model"]
            if small not in models:
                models[small] = _Model(spec, _model_spec(spec, small), task, dataset.base_users)
            results.append(run_cell(spec, cell, models[small], task, population_pool[: cell["population"]], holdout))
            log.info("cell %d: %s", cell["id"], json.dumps({k: results[-1][k] for k in
                                                             ("epsilon", "utility", "auc_base", "auc_calibrated", "update_norm")}))
            # The table so far, after every cell: a long grid can be read (and stopped) midway.
            write_ablation_outputs(run_dir, {**metrics_base, "cells": results, "reference": {},
                                             "complete": f"{len(results)} of {len(grid)} cells"}, time.time() - t0)
        reference = reference_attack(spec, models[False] if False in models else next(iter(models.values())),
                                     task, population_pool, holdout)
        write_ablation_outputs(run_dir, {**metrics_base, "cells": results, "reference": reference}, time.time() - t0)
        return run_dir


def _model_spec(spec: AblationSpec, small: bool) -> Any:
    bm = spec.run.experiment.base_model
    if not small:
        return bm
    path = spec.grid.small_model or str(tiny_random_model(bm))
    return dataclasses.replace(bm, path=path, quantization="none")


def _small_model_note(spec: AblationSpec, grid: list[dict[str, Any]]) -> str | None:
    n = sum(c["small_model"] for c in grid)
    if not n:
        return None
    what = spec.grid.small_model or "a 2-layer random Llama with the base model's tokenizer"
    return (f"{n} cell(s) with at least {spec.grid.small_model_min_population} users ran on the small model ({what}) "
            "through the same code path; their utility and AUC are not comparable with the full model's cells, "
            "their epsilon is (it depends only on z, q and the rounds).")


def tiny_random_model(base_model: Any) -> Path:
    """A 2-layer random Llama with the base model's tokenizer, made once in the cache."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = cache_root(base_model) / "tiny-random-llama"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(base_model)), trust_remote_code=False)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".tmp")
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out)
    return out


def _records(task: Any, users: list[Any]) -> list[Any]:
    """Each history item as the plain-prompt example the attack scores."""
    return [ex for u in users for ex in history_examples(task, u.history, None, "plain")]


def run_cell(spec: AblationSpec, cell: dict[str, Any], model: _Model, task: Any, population: list[Any],
             holdout: list[Any]) -> dict[str, Any]:
    """One cell: R rounds of DP-FedAvg over `population`, then utility and the attack."""
    import torch

    t0 = time.time()
    g, fspec = spec.grid, cell_spec(spec, cell)
    e, f = fspec.experiment, fspec.federation
    engine, p = model.engine, e.privacy
    engine.set_base_state({k: v.clone() for k, v in model.initial.items()})
    accounting = Accounting(fspec)
    record_ledgers: dict[str, RDPAccountant] = {}
    participated: set[str] = set()
    n = len(population)
    mech = ablation_mechanism(cell)
    seed = sampling_seed(spec)
    losses, norms, sampled = [], [], []
    if cell["federate_base_adapter"]:
        for rnd in range(1, g.rounds + 1):
            # THE round's participation: Poisson with q = m/N (m is the expected number per round).
            sample = participants(n, sample_rate=mech.sample_rate, seed=seed, rnd=rnd)
            sampled.append(len(sample))
            # Copies: the arrays `exchanged` returns may share memory with the live parameters.
            global_state = {k: v.copy() for k, v in exchanged(engine.base_state(), ffa_lora=f.ffa_lora).items()}
            updates = []
            for i in sample:
                user = population[i]
                participated.add(user.user_id)
                engine.set_base_state({k: v.clone() for k, v in model.initial.items()} | _to_torch(global_state, engine))
                store = InMemoryHistoryStore(task.item_text)
                store.add(user.history)
                ctx = Context(store, make_retriever("bm25", task.item_text), e.retrieval)
                examples = base_examples(task, ctx, user.history, rng=random.Random(g.seed + rnd))
                dp = None
                if cell["record_dp"]:
                    dp = DPSGD(noise_multiplier=p.record_noise_multiplier, max_grad_norm=p.record_clipping_norm,
                               expected_batch_size=f.local_train.batch_size, seed=g.seed * 1000 + cell["id"] * 100 + rnd)
                result = engine.train_base(examples, f.local_train, freeze_lora_a=f.ffa_lora, dp_sgd=dp, progress=False)
                losses.append(result.final_loss)
                if dp is not None:
                    dp.account(record_ledgers.setdefault(user.user_id, RDPAccountant()))
                updates.append({k: v.copy() for k, v in exchanged(engine.base_state(), ffa_lora=f.ffa_lora).items()})
            released = aggregate_round(global_state, updates, cell, population=n, rng=noise_generator(seed, rnd))
            norms += released.norms
            engine.set_base_state({k: v.clone() for k, v in model.initial.items()} | _to_torch(released.state, engine))
            accounting.record(released.event)
    # Utility of the shared base adapter on the population's held-out queries.
    preds, golds = [], []
    for u in population:
        answers = engine.answer([prompt_for(task, None, q.input, "plain") for q in u.queries],
                                max_new_tokens=engine.answer_tokens(task, u.history), personal=False, task=task)
        preds += [task.parse_output(a) for a in answers]
        golds += [q.target for q in u.queries]
    utility = task.score(preds, golds)
    members = _records(task, [u for u in population if u.user_id in participated] or population)
    mem, non = balanced(members, _records(task, holdout), g.mia_records, seed=g.seed + cell["id"])
    with torch.no_grad():
        result = attack(engine, mem, non, personal=False, max_length=f.local_train.max_length)
        # The same attack on the same records against the adapter before any round: what the
        # records' own differences give away without federation. auc_base minus this is the leak.
        final_state = {k: v.clone() for k, v in engine.base_state().items()}
        engine.set_base_state({k: v.clone() for k, v in model.initial.items()})
        before = attack(engine, mem, non, personal=False, max_length=f.local_train.max_length)
        engine.set_base_state(final_state)
    report = accounting.report() if cell["federate_base_adapter"] else None
    if cell["federate_base_adapter"]:
        eps = report["epsilon"] if report else None  # None: shared without noise, epsilon is infinite
    else:
        eps = 0.0  # nothing derived from a user's data leaves their machine
    record_eps = max((a.epsilon(delta=p.delta) for a in record_ledgers.values()), default=None)
    return {**cell, "epsilon": eps, "delta": p.delta, "record_epsilon": record_eps,
            "epsilon_rdp": report["epsilon_rdp"] if report else None,
            "epsilon_prv": report["epsilon_prv"] if report else None,
            "sample_rate": mech.sample_rate, "sampled_per_round": sampled,
            "utility": utility[task.metric_names[0]], "scores": utility, "auc_base": result["auc"], "attack": result,
            "auc_before": before["auc"], "auc_gain": result["auc"] - before["auc"],
            "auc_calibrated": calibrated_auc(result, before),
            "participants": len(participated), "local_loss": float(np.mean(losses)) if losses else None,
            "update_norm": float(np.mean(norms)) if norms else None,  # before clipping: to choose C
            "seconds": time.time() - t0}


def ablation_mechanism(cell: dict[str, Any]) -> Any:
    """A cell's DP-FedAvg parameters: its z and C, q = m/N (m = expected participants per round)."""
    return Mechanism(noise_multiplier=cell["noise_multiplier"], clipping_norm=cell["clipping_norm"],
                     sample_rate=cell["clients_per_round"] / cell["population"])


def sampling_seed(spec: AblationSpec) -> int:
    """The grid is a simulation and reproducible: participation and noise are seeded by
    federation.sampling_seed when set, else by grid.seed (the report says the epsilon assumes the
    seed is secret). Every cell uses the same draws (paired cells: the same users and the same
    standard-normal noise, scaled by each cell's std)."""
    s = spec.run.federation.sampling_seed
    return s if s >= 0 else spec.grid.seed


def aggregate_round(global_state: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]], cell: dict[str, Any], *,
                    population: int, rng: np.random.Generator) -> Any:
    """The cell's round: THE DP-FedAvg round of shared/aggregation.py (the coordinator's)."""
    return dp_fedavg_round(global_state, updates, mechanism=ablation_mechanism(cell), population=population, rng=rng)


def _to_torch(state: dict[str, np.ndarray], engine: Any) -> dict[str, Any]:
    import torch

    dtype = next(iter(engine.base_state().values())).dtype
    return {k: torch.from_numpy(np.array(v, copy=True)).to(dtype) for k, v in state.items()}


def reference_attack(spec: AblationSpec, model: _Model, task: Any, population: list[Any],
                     holdout: list[Any]) -> dict[str, Any]:
    """The attack against unprotected personal adapters (each owner's records vs hold-out records)."""
    g, e = spec.grid, spec.run.experiment
    engine = model.engine
    engine.set_base_state({k: v.clone() for k, v in model.initial.items()})
    per_user = []
    for i, user in enumerate(population[: g.reference_users]):
        members = history_examples(task, user.history, None, "plain")
        engine.train_personal(members, e.personal_train, fresh=True, progress=False)
        mem, non = balanced(members, _records(task, holdout), g.mia_records, seed=g.seed + 1000 + i)
        per_user.append(attack(engine, mem, non, personal=True, max_length=e.personal_train.max_length))
    engine.reset_personal()
    if not per_user:
        return {}
    return {"auc": float(np.mean([r["auc"] for r in per_user])), "users": len(per_user), "per_user": per_user}

