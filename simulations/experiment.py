"""`oppu experiment`: compare non-personalized, RAG, PAG, OPPU, OPPU+RAG, OPPU+PAG on the same
users and queries, and write a self-contained run directory.

run_dir/
  config.toml            the resolved ExperimentSpec (rerun with `oppu experiment --config`)
  data.json              where the users came from, counts, notes
  base_adapter/          the shared base adapter (PEFT format + manifest)
  users/<id>/            history store, profile, personal adapters, predictions per method
  predictions/<m>.json   all users' predictions per method, LaMP outputs format
  metrics.json           aggregate + per-user metrics, improvement over non-personalized
  results.md             the aggregate table
  metrics.md, plots/, REPORT.md, run.json   see simulations/reports/run_outputs.py
  log.txt                the run's log
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from shared.adapters import AdapterManifest
from shared.baselines import personal_baselines
from shared.config import ExperimentSpec, dump_toml, to_dict
from shared.data import load_dataset, write_predictions
from shared.engine import Engine
from shared.fileio import atomic_write
from shared.metrics import gain
from shared.personalize import (
    METHOD_AUGMENTATION,
    PERSONAL_METHODS,
    Context,
    ensure_profile,
    history_examples,
    population_base_examples,
    prompt_for,
)
from shared.records import TaskDataset, UserData
from shared.retrieval import make_retriever
from shared.rundir import new_run_dir, run_log
from shared.selection import train_and_select_users
from shared.stats import compare_methods, pooled_scorer
from shared.tasks import get_task

from .centralized import run_centralized
from .reports.run_outputs import scores_section, write_outputs

log = logging.getLogger("oppu.experiment")


@dataclass
class UserResult:
    user_id: str
    history: int
    predictions: dict[str, dict[str, str]] = field(default_factory=dict)  # method -> qid -> answer
    train: dict[str, dict[str, float]] = field(default_factory=dict)  # augmentation -> stats
    selection: dict[str, dict[str, Any]] = field(default_factory=dict)  # augmentation -> Selection.to_dict()


def open_store(spec: ExperimentSpec, directory: Path, task: Any) -> Any:
    """A simulated user's history store, of the kind and for the retriever `spec` names."""
    from client.store import open_history_store  # chromadb: imported only when a run needs it

    return open_history_store(spec.retrieval.store, directory, task.item_text, retriever=spec.retrieval.retriever)


def run_experiment(spec: ExperimentSpec, run_dir: Path | None = None, *, progress: bool = True,
                   between_users: Callable[[], Any] | None = None) -> Path:
    """One experiment into `run_dir` (default: a new one under spec.out_dir). `between_users()`
    runs before each group of users is prepared and trained (e.g. simulations.quality's children
    take over the cores a finished side-by-side run freed)."""
    get_task(spec.data.task)  # an unknown task name fails here, listing the valid ones
    dataset = load_dataset(spec.data)
    task = get_task(dataset.task)
    run_dir = Path(run_dir) if run_dir else new_run_dir(spec.out_dir, dataset.task)
    with run_log(run_dir):
        return _run(spec, dataset, task, run_dir, progress, between_users)


def _run(spec: ExperimentSpec, dataset: TaskDataset, task: Any, run_dir: Path, progress: bool,
         between_users: Callable[[], Any] | None = None) -> Path:
    started = time.time()
    atomic_write(run_dir / "config.toml", dump_toml(to_dict(spec)))
    data_info = {
        "task": dataset.task,
        "source": dataset.source,
        "notes": dataset.notes,
        "eval_users": len(dataset.eval_users),
        "base_users": len(dataset.base_users),
        "queries": sum(len(u.queries) for u in dataset.eval_users),
        "history_per_user": {u.user_id: len(u.history) for u in dataset.eval_users},
        "users": {u.user_id: {"history": len(u.history), "level": dataset.levels.get(u.user_id)}
                  for u in dataset.eval_users},
    }
    atomic_write(run_dir / "data.json", json.dumps(data_info, indent=2))
    for note in dataset.notes:
        log.info(note)
    log.info("task %s from %s: %d evaluated users, %d base users", dataset.task, dataset.source,
             len(dataset.eval_users), len(dataset.base_users))

    engine = Engine(spec.base_model, spec.base_adapter, spec.personal_adapter, seed=spec.personal_train.seed,
                    decoding=spec.decoding)
    log.info("base model %s (%s, %s on %s), hash %s", engine.base.directory, engine.base.quantization,
             engine.base.dtype, engine.base.device, engine.model_hash[:12])

    # 1. The shared base adapter, from users who are never evaluated.
    examples = population_base_examples(task, spec, dataset.base_users)
    base_result = engine.train_base(examples, spec.base_train, progress="base adapter" if progress else False)
    log.info("base adapter: %d examples, %d steps, loss %.3f, %.0f tokens/s", len(examples),
             base_result.steps, base_result.final_loss, base_result.tokens_per_second)
    engine.save_base(run_dir / "base_adapter", AdapterManifest(
        role="base", base_model_hash=engine.model_hash, task=dataset.task,
        peft_type=spec.base_adapter.peft_type,
        data={"users": len(dataset.base_users), "examples": len(examples)},
        train={"steps": base_result.steps, "final_loss": base_result.final_loss},
    ))

    # 2. Each evaluated user: store, profile, personal adapters, answers for every method.
    retriever = make_retriever(spec.retrieval.retriever, task.item_text)
    results = _run_users(spec, engine, task, retriever, dataset.eval_users, run_dir, progress, between_users)

    # 2b. The centralized baseline: one adapter on all evaluated users' pooled histories.
    if "centralized" in spec.methods:
        central = run_centralized(engine, task, spec, dataset.eval_users, run_dir / "centralized_adapter",
                                  progress="centralized adapter" if progress else False)
        for r in results:
            r.predictions["centralized"] = central.predictions[r.user_id]
            r.train["centralized"] = central.train

    # 3. Scores, exactly as LaMP computes them, pooled over all queries and per user.
    metrics = score(task, spec.methods, dataset.eval_users, results, base_users=dataset.base_users)
    metrics["adoption"] = adoption_counts(spec.methods, results)
    metrics["selection"] = {r.user_id: r.selection for r in results}
    metrics["base_adapter"] = {"examples": len(examples), "steps": base_result.steps,
                               "final_loss": base_result.final_loss, "seconds": base_result.seconds}
    metrics["seconds"] = time.time() - started
    for m in spec.methods:
        merged = {qid: a for r in results for qid, a in r.predictions[m].items()}
        write_predictions(run_dir / "predictions" / f"{_safe(m)}.json", dataset.task, merged)
    write_outputs(run_dir, "experiment", metrics, data_info, seconds=metrics["seconds"])
    atomic_write(run_dir / "results.md", render_results(metrics, data_info))
    log.info("run finished in %.0f s: %s", metrics["seconds"], run_dir)
    return run_dir


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


@dataclass
class _UserRun:
    """One evaluated user between preparation and personal training."""

    user: UserData
    udir: Path
    ctx: Context
    prompts: dict[str, list[str]]  # augmentation -> one prompt per query
    result: UserResult
    non_personal: dict[str, dict[str, str]] = field(default_factory=dict)  # aug -> qid -> answer


def _prepare_user(spec: ExperimentSpec, engine: Engine, task: Any, retriever: Any, user: UserData,
                  udir: Path) -> _UserRun:
    """The user's store and profile, prompts, and the answers of the non-personal methods."""
    udir.mkdir(parents=True, exist_ok=True)
    store = open_store(spec, udir / "history", task)
    store.add(user.history)
    ctx = Context(store, retriever, spec.retrieval, profile=user.profile_text)
    if user.profile_text:
        store.set_profile(user.profile_text)
    augs_needed = {METHOD_AUGMENTATION[m] for m in spec.methods if m in METHOD_AUGMENTATION}
    if "pag" in augs_needed:
        ensure_profile(engine, task, ctx, user.history, seed=spec.data.seed)
    # Queries come after all history, so they retrieve from the whole store.
    prompts = {aug: [prompt_for(task, ctx, q.input, aug) for q in user.queries] for aug in augs_needed}
    run = _UserRun(user, udir, ctx, prompts, UserResult(user.user_id, len(user.history)))
    for m in [m for m in spec.methods if m in METHOD_AUGMENTATION and m not in PERSONAL_METHODS]:
        run.result.predictions[m] = _answer_without_personal(engine, task, run, METHOD_AUGMENTATION[m])
    return run


def _answer_without_personal(engine: Engine, task: Any, run: _UserRun, aug: str) -> dict[str, str]:
    """Base + base adapter's answers for one augmentation (computed once per user)."""
    if aug not in run.non_personal:
        answers = engine.answer(run.prompts[aug], max_new_tokens=engine.answer_tokens(task, run.user.history),
                                personal=False, task=task)
        run.non_personal[aug] = {q.id: task.parse_output(a) for q, a in zip(run.user.queries, answers)}
    return run.non_personal[aug]


def _run_users(spec: ExperimentSpec, engine: Engine, task: Any, retriever: Any, users: Sequence[UserData],
               run_dir: Path, progress: bool, between_users: Callable[[], Any] | None = None) -> list[UserResult]:
    """Every evaluated user, `personal_train.users_per_pass` at a time: their personal adapters
    are trained together in one pass (shared.group_training), each selected on its own user's
    validation items exactly as if trained alone (shared.selection.train_and_select_group)."""
    from tqdm.auto import tqdm

    per_pass = spec.personal_train.users_per_pass  # train_and_select_users falls back to one for soft prompts
    results: list[UserResult] = []
    bar = tqdm(total=len(users), desc="users", disable=not progress, unit="user")
    for start in range(0, len(users), per_pass):
        if between_users is not None:
            between_users()
        runs = [_prepare_user(spec, engine, task, retriever, u, run_dir / "users" / _safe(u.user_id))
                for u in users[start : start + per_pass]]
        for aug in ("plain", "rag", "pag"):
            methods = [m for m in spec.methods if m in PERSONAL_METHODS and METHOD_AUGMENTATION[m] == aug]
            if methods:
                _train_personal(spec, engine, task, runs, aug, methods, progress)
        for run in runs:
            atomic_write(run.udir / "predictions.json", json.dumps(run.result.predictions, indent=2))
            atomic_write(run.udir / "selection.json", json.dumps(run.result.selection, indent=2))
            results.append(run.result)
        bar.update(len(runs))
    bar.close()
    return results


def _train_personal(spec: ExperimentSpec, engine: Engine, task: Any, runs: list[_UserRun], aug: str,
                    methods: list[str], progress: bool) -> None:
    """Personal adapters of `runs`' users for one augmentation; each adopted adapter is saved and
    answers its user's queries, the others answer as the non-personal counterpart."""
    examples = [history_examples(task, r.user.history, r.ctx, aug) for r in runs]
    label = (f"{runs[0].user.user_id[:14]} personal ({aug})" if len(runs) == 1
             else f"{len(runs)} users personal ({aug})")
    decided = train_and_select_users(engine, task, examples, spec.personal_train, spec.selection,
                                     progress=label if progress else False)
    for run, ex, (tr, sel, state) in zip(runs, examples, decided):
        res = run.result
        res.selection[aug] = sel.to_dict()
        res.train[aug] = {"examples": len(ex), "steps": tr.steps, "final_loss": tr.final_loss,
                          "seconds": tr.seconds, "tokens_per_second": tr.tokens_per_second,
                          "adopted": sel.adopted, "users_per_pass": len(runs)}
        log.info("user %s personal (%s): %s", run.user.user_id, aug, sel.summary())
        if state is not None:
            engine.set_personal_state(state, label="trained")
            engine.save_personal(run.udir / f"personal-{aug}", AdapterManifest(
                role="personal", base_model_hash=engine.model_hash, task=task.name,
                peft_type=spec.personal_adapter.peft_type,
                data={"history_items": len(run.user.history), "examples": sel.train_items,
                      "validation_items": sel.validation_items},
                train=res.train[aug],
            ))
            answers = engine.answer(run.prompts[aug], max_new_tokens=engine.answer_tokens(task, run.user.history),
                                    personal=True, task=task)
            chosen = {q.id: task.parse_output(a) for q, a in zip(run.user.queries, answers)}
        else:  # not adopted: the method answers as its non-personal counterpart
            chosen = _answer_without_personal(engine, task, run, aug)
        for m in methods:
            res.predictions[m] = dict(chosen)
    engine.reset_personal()


def adoption_counts(methods: tuple[str, ...], results: list[UserResult]) -> dict[str, dict[str, int]]:
    """Per personal method: how many users' personal adapters were adopted ("adopted: 11/16")."""
    out = {}
    for m in methods:
        aug = METHOD_AUGMENTATION.get(m)
        if m in PERSONAL_METHODS and aug is not None:
            decided = [r.selection[aug]["adopted"] for r in results if aug in r.selection]
            out[m] = {"adopted": sum(bool(a) for a in decided), "users": len(decided)}
    return out


def score(task: Any, methods: tuple[str, ...], users: list[UserData], results: list[UserResult], *,
          base_users: Sequence[UserData] = (), n_boot: int = 2000, n_perm: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Scores exactly as LaMP computes them (all queries pooled, and per user), the non-LLM personal
    baselines (shared/baselines.py) on the same queries, and how sure each number is
    (shared/stats.py): a bootstrap CI over users per method, and paired differences with CI and
    permutation p against non-personalized, RAG and the best baseline.

    `base_users` (never evaluated) give the baselines their global majority answer.
    """
    golds = {q.id: q.target for u in users for q in u.queries}
    aggregate: dict[str, dict[str, float]] = {}
    per_user: dict[str, dict[str, dict[str, float]]] = {}
    for m in methods:
        qids = [qid for r in results for qid in r.predictions[m]]
        preds = [r.predictions[m][qid] for r in results for qid in r.predictions[m]]
        aggregate[m] = task.score(preds, [golds[q] for q in qids])
        for r in results:
            per_user.setdefault(r.user_id, {})[m] = task.score(
                list(r.predictions[m].values()), [golds[q] for q in r.predictions[m]]
            )
    improvement: dict[str, dict[str, float | None]] = {}
    ref = aggregate.get("non-personalized")
    if ref:
        for m, scores in aggregate.items():
            # Relative change is undefined against a zero score: report None there.
            improvement[m] = {k: gain(v, ref[k], k) / abs(ref[k]) if ref[k] else None for k, v in scores.items()}
    out = {"task": task.name, "methods": list(methods), "aggregate": aggregate,
           "improvement_over_non_personalized": improvement, "per_user": per_user,
           "training": {r.user_id: r.train for r in results}}
    out.update(uncertainty(task, methods, users, results, base_users=base_users, n_boot=n_boot, n_perm=n_perm,
                           seed=seed))
    return out


def uncertainty(task: Any, methods: Sequence[str], users: list[UserData], results: list[UserResult], *,
                base_users: Sequence[UserData] = (), n_boot: int = 2000, n_perm: int = 2000,
                seed: int = 0) -> dict[str, Any]:
    """{"baselines": their scores, "stats": CIs and paired differences} for score()."""
    by_id = {u.user_id: u for u in users}
    scored = [by_id[r.user_id] for r in results]
    # One query order per user, shared by every method, so the comparisons are paired.
    qids = [[q.id for q in u.queries] for u in scored]
    golds = [[q.target for q in u.queries] for u in scored]
    base_preds = personal_baselines(task, scored, base_users)
    preds = {m: [[r.predictions[m][q] for q in ids] for r, ids in zip(results, qids)] for m in methods}
    preds.update({b: [[p[q] for q in ids] for ids in qids] for b, p in base_preds.items()})
    flat_golds = [g for gs in golds for g in gs]
    baselines: dict[str, Any] = {"methods": list(base_preds), "aggregate": {}, "per_user": {}, "best": None}
    for b in base_preds:
        baselines["aggregate"][b] = task.score([p for ps in preds[b] for p in ps], flat_golds)
        for u, ps, gs in zip(scored, preds[b], golds):
            baselines["per_user"].setdefault(u.user_id, {})[b] = task.score(ps, gs)
    primary = task.metric_names[0]
    if base_preds:
        baselines["best"] = max(base_preds, key=lambda b: gain(baselines["aggregate"][b][primary], 0.0, primary))
    references = [r for r in ("non-personalized", "RAG") if r in methods] + \
        ([baselines["best"]] if baselines["best"] else [])
    stats = compare_methods(pooled_scorer(task), preds, golds, references, n_boot=n_boot, n_perm=n_perm, seed=seed)
    stats["references"] = references
    stats["metric"] = primary
    stats["best_baseline"] = baselines["best"]
    stats["below_best_baseline"] = ([m for m in methods if stats["vs"][baselines["best"]][m][primary]["gain"] <= 0]
                                    if baselines["best"] else [])
    return {"baselines": baselines, "stats": stats}


def render_results(metrics: dict[str, Any], data_info: dict[str, Any]) -> str:
    lines = [
        f"# {metrics['task']}: {data_info['eval_users']} users, {data_info['queries']} queries",
        "",
        f"Data: {data_info['source']}",
    ]
    lines += [f"Note: {n}" for n in data_info.get("notes", [])]
    return "\n".join(lines + [""] + scores_section(metrics)) + "\n"
