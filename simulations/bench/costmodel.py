"""A cost model of `oppu simulate`: its wall time on this machine for N users x R rounds,
predicted from coefficients the bench measures here (simulations/bench/costcoeffs.py).

    python -m simulations.bench --sections costmodel --out bench          # measure (about 3 min)
    python -m simulations.bench.costmodel --coefficients bench/results.json \
        [--config simulations/configs/simulate.toml] [--users 32] [--rounds 2] [--set K=V ...]

What the simulation does, phase by phase, and what each costs (seconds; `train(...)`,
`score(...)`, `answer(...)` are the measured linear costs of THE training loop, of per-user
validation scoring and of generation, each in the process that runs it):

- start-up: write the N users' data directories (Chroma stores), export and load the model in
  the coordinator, start Ray; each of the W = cores / sim_client_cpus worker processes imports
  the client and loads the model with its first message (client.rounds.engine_for), counted in
  the first phase that reaches the workers;
- initial base adapter: train(the population's base examples, base_train) in the coordinator;
- an evaluation (before round 1, and after every round but the last when evaluate_every = 1):
  every user answers its queries, non-personalized;
- round r: each sampled user (the seeded Poisson draw of coordinator.sampling when the config
  seeds it, else the expected q·N) trains a personal adapter per augmentation through
  shared.selection (base scored on the validation items, training, `checks` checkpoints
  scored) and its local base-adapter update. Where the run puts users in cohorts
  (coordinator/cohorts.py: personal_train.users_per_pass), each cohort's personal adapters are
  one task first (one worker, one pass; costed as its users' trainings one after another, which
  is what a pass of several users measured on a CPU: docs/benchmarks.md, "Many users in one
  pass"), then every user's local update is a task of its own;
- final evaluation: every user answers its queries for each method; users never sampled train
  their personal adapters there first (client.rounds.load_or_train_personal);
- centralized baseline: train(every user's history, personal_train) and answer every query, in
  the coordinator.

The users' work of a phase is spread over the W workers as Ray does: each next user goes to the
worker that is free first. Per user and task there is a fixed cost (opening the user's store,
writing adapters) measured with the rest. The training and scoring inside a personal adapter's
selection is data-dependent: when base + base adapter already scores the best possible metric on
a user's validation items, nothing is trained (shared.selection). No cost model can know that
before answering those items, so the prediction states the share of personal trainings it
assumes skipped (`--skipped`, default 0: every one trains, an upper bound) and the range
between none and all skipped. Not modelled: Flower's and Ray's messaging (a few milliseconds per
message), the one-time streaming of the model to the client cache on a machine that never ran a
simulation, and any other program on the machine (the coefficients are measured as loaded as
the machine is then).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from coordinator import cohorts
from coordinator.sampling import sample_round
from shared.config import load_federated
from shared.data import load_dataset
from shared.model_source import resolve_model_dir
from shared.personalize import (METHOD_AUGMENTATION, PERSONAL_METHODS, Context, base_examples, history_examples,
                                population_base_examples, prompt_for)
from shared.prompting import encode_prompt
from shared.retrieval import InMemoryHistoryStore, make_retriever
from shared.selection import validation_size
from shared.tasks import get_task
from shared.training import encode_examples, step_plan
from simulations.centralized import pooled_examples

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "simulate.toml"


# ------------------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class TrainCost:
    """One call of THE training loop: per call + per step + per padded token (forward+backward)."""

    call_s: float
    step_s: float
    token_s: float

    def seconds(self, w: "TrainWork") -> float:
        if not w.steps:
            return 0.0
        return self.call_s + self.step_s * w.steps + self.token_s * w.padded_tokens


@dataclass(frozen=True)
class AnswerCost:
    """One Engine.answer call (or one validation `score`): per call + per row + per prompt token."""

    call_s: float
    row_s: float
    token_s: float

    def seconds(self, rows: int, tokens: int, calls: int = 1) -> float:
        return self.call_s * calls + self.row_s * rows + self.token_s * tokens if rows else 0.0


@dataclass(frozen=True)
class ProcessCosts:
    """What one process (a worker, or the coordinator) measured, with its torch threads."""

    threads: int
    load_s: float  # import of the client/engine modules and loading the base model
    train: TrainCost
    answer: AnswerCost  # Engine.answer, as evaluation calls it (the user's queries in one call)
    score: AnswerCost | None = None  # shared.selection.score on validation items (workers)
    selection_s: float = 0.0  # per selection: the 4-bit base dequantized once (shared.selection)
    user_task_s: float = 0.0  # per user and message: open/close the store, write adapters (workers)


@dataclass(frozen=True)
class Coefficients:
    worker: ProcessCosts
    driver: ProcessCosts
    prepare_user_s: float  # per user: its data directory and history store (simulate.prepare_users)
    ray_start_s: float
    concurrent_workers: int  # how many worker processes measured at once (as the simulation runs)
    machine: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Coefficients":
        def proc(p: dict[str, Any]) -> ProcessCosts:
            return ProcessCosts(threads=int(p["threads"]), load_s=float(p["load_s"]), train=TrainCost(**p["train"]),
                                answer=AnswerCost(**p["answer"]),
                                score=AnswerCost(**p["score"]) if p.get("score") else None,
                                selection_s=float(p.get("selection_s", 0.0)), user_task_s=float(p.get("user_task_s", 0.0)))

        return cls(worker=proc(d["worker"]), driver=proc(d["driver"]), prepare_user_s=float(d["prepare_user_s"]),
                   ray_start_s=float(d["ray_start_s"]), concurrent_workers=int(d["concurrent_workers"]),
                   machine=dict(d.get("machine", {})))


def read_coefficients(path: Path) -> Coefficients:
    """From a bench results.json (its `costmodel` job) or a file holding the coefficients alone."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file; measure the coefficients first: "
                         "python -m simulations.bench --sections costmodel --out bench") from None
    if "jobs" in data:
        job = data["jobs"].get("costmodel")
        if not job or "error" in job:
            raise SystemExit(f"{path} holds no costmodel measurement (job 'costmodel' missing or failed); "
                             "run: python -m simulations.bench --sections costmodel")
        data = job
    try:
        return Coefficients.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"{path}: not a costmodel measurement ({e!r}); rerun "
                         "python -m simulations.bench --sections costmodel") from None


# ------------------------------------------------------------------------------------- work


@dataclass(frozen=True)
class TrainWork:
    steps: int
    padded_tokens: int


@dataclass(frozen=True)
class Rows:
    """Prompts answered (or validation items scored) and their prompt tokens."""

    rows: int
    tokens: int


@dataclass(frozen=True)
class Personalization:
    """One user's personal adapter for one augmentation through shared.selection."""

    validation: Rows  # scored once with base, and again at every checkpoint
    train: TrainWork  # the full personal_train run
    trains: bool  # enough history to train at all (selection.min_train)


@dataclass(frozen=True)
class UserWork:
    queries: dict[str, Rows]  # augmentation -> the user's query prompts under it
    personal: dict[str, Personalization]  # augmentation -> its personal adapter's work
    local_base: TrainWork  # the user's local base-adapter update (federation.local_train)


@dataclass(frozen=True)
class Workload:
    """Everything the simulation computes, counted from the config and the data (no model run)."""

    users: list[UserWork]
    initial_base: TrainWork
    centralized: TrainWork
    centralized_queries: list[Rows]
    sampled: list[list[int]]  # per round, the users that train
    rounds: int
    evaluate_between: list[int]  # rounds after which the non-personalized evaluation runs
    evaluate_before: bool
    methods: tuple[str, ...]
    workers: int
    checks: int
    federate: bool
    sampling: str  # how `sampled` was obtained
    per_pass: int = 1  # users per cohort of a round's personal phase (1: no cohorts; coordinator/cohorts.py)


def train_work(tokenizer: Any, examples: Sequence[Any], spec: Any) -> TrainWork:
    """Steps and padded tokens of THE training loop on `examples` (its own batch plan)."""

    if not examples:
        return TrainWork(0, 0)
    enc = encode_examples(tokenizer, examples, spec.max_length)
    plan = step_plan(enc, spec, random.Random(spec.seed))
    return TrainWork(len(plan), sum(len(b) * max(len(enc[i].input_ids) for i in b) for b in plan))


def prompt_rows(tokenizer: Any, prompts: Sequence[str]) -> Rows:

    return Rows(len(prompts), sum(len(encode_prompt(tokenizer, p)) for p in prompts))


def sampled_users(spec: Any, n: int) -> tuple[list[list[int]], str]:
    """Who trains in each round: the coordinator's own draw when the config makes it
    reproducible (coordinator.sampling.sample_round over the users in partition order), else
    the expected number q·N (the first ones: the model only needs how many and how often)."""

    f = spec.federation
    seeded = not spec.dp or f.sampling_seed >= 0
    if seeded:
        return [sample_round(list(range(n)), spec, r)[0] for r in range(1, f.rounds + 1)], (
            "the coordinator's seeded draw" if spec.dp else "the coordinator's seeded fixed-size sample")
    m = round(f.fraction_train * n)
    return [[(i + r * m) % n for i in range(m)] for r in range(f.rounds)], f"expected q*N = {m} per round (unseeded)"


def workload(spec: Any, *, cores: int) -> Workload:
    """Count the simulation's work for `spec` (its data read, its prompts tokenized)."""
    from transformers import AutoTokenizer


    e, f = spec.experiment, spec.federation
    unsupported = [m for m in e.methods if METHOD_AUGMENTATION.get(m) == "pag"]
    if unsupported:  # a profile costs a generation pass per user; not measured
        raise SystemExit(f"the cost model does not cover PAG methods ({', '.join(unsupported)}); "
                         "drop them from `methods` for a prediction")
    if e.retrieval.retriever != "bm25":
        raise SystemExit(f"the cost model covers retrieval.retriever = 'bm25' only, not {e.retrieval.retriever!r} "
                         "(dense retrieval embeds every history item: not measured)")
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(e.base_model)), trust_remote_code=False)
    dataset = load_dataset(e.data)
    task = get_task(dataset.task)
    augs = sorted({METHOD_AUGMENTATION[m] for m in e.methods if m != "centralized"})
    personal_augs = sorted({METHOD_AUGMENTATION[m] for m in e.methods if m in PERSONAL_METHODS})
    users = []
    for u in dataset.eval_users:
        store = InMemoryHistoryStore(task.item_text)
        store.add(u.history)
        ctx = Context(store, make_retriever(e.retrieval.retriever, task.item_text), e.retrieval)
        queries = {a: prompt_rows(tokenizer, [prompt_for(task, ctx, q.input, a) for q in u.queries]) for a in augs}
        personal = {}
        for a in personal_augs:
            ex = history_examples(task, u.history, ctx, a)
            n_val = validation_size(len(ex), e.selection)
            train_ex, val_ex = ex[: len(ex) - n_val], ex[len(ex) - n_val:]
            trains = len(train_ex) >= e.selection.min_train
            val = prompt_rows(tokenizer, [x.prompt for x in val_ex]) if trains else Rows(0, 0)
            personal[a] = Personalization(val, train_work(tokenizer, train_ex if trains else [], e.personal_train),
                                          trains)
        local = base_examples(task, ctx, u.history, rng=random.Random(f.seed + 1))
        users.append(UserWork(queries, personal, train_work(tokenizer, local, f.local_train)))
    initial = (train_work(tokenizer, population_base_examples(task, e, dataset.base_users), e.base_train)
               if f.base_init == "train" and dataset.base_users else TrainWork(0, 0))
    central, central_q = TrainWork(0, 0), []
    if "centralized" in e.methods:
        central = train_work(tokenizer, pooled_examples(task, dataset.eval_users, seed=e.personal_train.seed),
                             e.personal_train)
        central_q = [prompt_rows(tokenizer, [prompt_for(task, None, q.input, "plain") for q in u.queries])
                     for u in dataset.eval_users]
    sampled, how = sampled_users(spec, len(users))
    every = f.evaluate_every
    return Workload(
        users=users, initial_base=initial, centralized=central, centralized_queries=central_q, sampled=sampled,
        rounds=f.rounds, evaluate_before=bool(every), methods=tuple(e.methods),
        evaluate_between=[r for r in range(1, f.rounds + 1) if every and r % every == 0 and r < f.rounds],
        workers=max(1, int(cores // f.sim_client_cpus)), checks=e.selection.scored_checks if e.selection.enabled else 0,
        federate=e.privacy.federate_base_adapter, sampling=how,
        per_pass=e.personal_train.users_per_pass if cohorts.applies(spec, list(e.methods)) else 1)


# ------------------------------------------------------------------------------------- model


def spread(tasks: Sequence[float], workers: int) -> float:
    """Wall time of independent tasks on `workers` processes, each next task to the first free."""
    free = [0.0] * max(1, workers)
    for t in tasks:
        i = free.index(min(free))
        free[i] += t
    return max(free) if tasks else 0.0


def personalization_s(p: Personalization, c: ProcessCosts, checks: int, skipped: float) -> float:
    """shared.selection.train_and_select for one user and augmentation."""
    if not p.trains:
        return 0.0
    score = c.score or c.answer
    base = c.selection_s + score.seconds(p.validation.rows, p.validation.tokens, math.ceil(p.validation.rows / 4))
    trained = c.train.seconds(p.train) + checks * score.seconds(p.validation.rows, p.validation.tokens,
                                                                 math.ceil(p.validation.rows / 4))
    return base + (1.0 - skipped) * trained


@dataclass
class Prediction:
    phases: dict[str, float]
    notes: list[str]

    @property
    def total(self) -> float:
        return sum(self.phases.values())


def predict(w: Workload, c: Coefficients, *, skipped: float = 0.0) -> Prediction:
    """Seconds per phase of the simulation; `skipped`: the share of personal trainings that
    selection skips (base already scores the best metric on the user's validation items)."""
    if not 0.0 <= skipped <= 1.0:
        raise ValueError(f"skipped={skipped!r}: a share of personal trainings, between 0 and 1")
    wk, dr = c.worker, c.driver
    n = len(w.users)
    phases: dict[str, float] = {}
    phases["start-up"] = n * c.prepare_user_s + dr.load_s + c.ray_start_s
    phases["initial base adapter"] = dr.train.seconds(w.initial_base)
    # Each worker loads the model on its first message (client.rounds.engine_for), all at once.
    first_message = [wk.load_s]

    def first(tasks: list[float]) -> list[float]:
        if first_message and tasks:
            load = first_message.pop()
            tasks = [t + load if i < w.workers else t for i, t in enumerate(tasks)]
        return tasks

    def plain_eval() -> float:
        return spread(first([wk.user_task_s + wk.answer.seconds(u.queries["plain"].rows, u.queries["plain"].tokens)
                             for u in w.users]), w.workers)

    if w.evaluate_before:
        phases["evaluation before round 1"] = plain_eval()
    trained_once: set[int] = set()
    def personal(i: int) -> float:
        return sum(personalization_s(p, wk, w.checks, skipped) for p in w.users[i].personal.values())

    for r, sample in enumerate(w.sampled, start=1):
        groups = cohorts.split(list(sample), w.per_pass, w.workers)
        in_group = {i for g in groups for i in g}
        # The personal phase: one task per cohort, its users one after another.
        phase = spread(first([sum(wk.user_task_s + personal(i) for i in g) for g in groups]), w.workers)
        tasks = []
        for i in sample:
            t = wk.user_task_s + (0.0 if i in in_group else personal(i))
            if w.federate:
                t += wk.train.seconds(w.users[i].local_base)
            tasks.append(t)
            trained_once.add(i)
        phases[f"round {r}"] = phase + spread(first(tasks), w.workers)
        if r in w.evaluate_between:
            phases[f"round {r}"] += plain_eval()
    final = []
    for i, u in enumerate(w.users):
        t = wk.user_task_s
        for m in w.methods:
            if m == "centralized":
                continue
            aug = METHOD_AUGMENTATION[m]
            if m in PERSONAL_METHODS and i not in trained_once:
                t += personalization_s(u.personal[aug], wk, w.checks, skipped)
            t += wk.answer.seconds(u.queries[aug].rows, u.queries[aug].tokens)
        final.append(t)
    phases["final evaluation"] = spread(first(final), w.workers)
    if "centralized" in w.methods:
        # its own engine (simulate.centralized_baseline loads the model again)
        phases["centralized baseline"] = dr.load_s + dr.train.seconds(w.centralized) + sum(
            dr.answer.seconds(q.rows, q.tokens) for q in w.centralized_queries)
    never = sum(1 for i in range(n) if i not in trained_once)
    notes = [f"{n} users, {w.rounds} rounds, {w.workers} worker process(es) of {wk.threads} thread(s); sampled per "
             f"round: {', '.join(str(len(s)) for s in w.sampled)} ({w.sampling}); {never} users never sampled "
             "train their personal adapters in the final evaluation",
             f"personal trainings skipped by selection assumed: {skipped:.0%}"]
    return Prediction(phases, notes)


# ------------------------------------------------------------------------------------- command


def load_spec(config: str | None, users: int | None, rounds: int | None, sets: Sequence[str]) -> Any:
    """The FederatedSpec `oppu simulate --config C --users N --rounds R --set ...` would run."""

    overrides = list(sets)
    if users is not None:
        overrides.append(f"data.users={users}")
    if rounds is not None:
        overrides.append(f"federation.rounds={rounds}")
    return load_federated(config or str(DEFAULT_CONFIG), overrides)


def render(pred: Prediction, low: Prediction, high: Prediction, c: Coefficients) -> str:
    lines = ["| phase | predicted s |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in pred.phases.items()]
    lines.append(f"| **total** | **{pred.total:.0f}** ({pred.total / 60:.1f} min) |")
    lines += ["", *pred.notes,
              f"range: {low.total:.0f} s (every personal training skipped) to {high.total:.0f} s (none skipped)",
              f"coefficients measured on: {c.machine.get('cpu', '?')}, {c.machine.get('cores', '?')} cores, "
              f"load average {c.machine.get('load_average', '?')} ({c.concurrent_workers} workers measured at once)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.bench.costmodel", description=__doc__.split("\n\n")[0])
    p.add_argument("--coefficients", default="bench/results.json",
                   help="bench results.json holding a costmodel measurement (python -m simulations.bench --sections costmodel)")
    p.add_argument("--config", help=f"simulate config (default {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])})")
    p.add_argument("--users", type=int, help="data.users")
    p.add_argument("--rounds", type=int, help="federation.rounds")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any setting (repeatable)")
    p.add_argument("--skipped", type=float, default=0.0,
                   help="share of personal trainings selection skips (base already best on validation); default 0")
    p.add_argument("--cores", type=int, default=0, help="cores Ray may use (default: this machine's)")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    args = p.parse_args(argv)
    import os

    coeffs = read_coefficients(Path(args.coefficients))
    spec = load_spec(args.config, args.users, args.rounds, args.set)
    w = workload(spec, cores=args.cores or os.cpu_count() or 1)
    pred = predict(w, coeffs, skipped=args.skipped)
    low, high = predict(w, coeffs, skipped=1.0), predict(w, coeffs, skipped=0.0)
    if args.json:
        print(json.dumps({"phases": pred.phases, "total": pred.total, "low": low.total, "high": high.total,
                          "notes": pred.notes}, indent=2))
    else:
        print(render(pred, low, high, coeffs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
