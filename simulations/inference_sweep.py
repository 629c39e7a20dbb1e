"""`oppu sweep` in inference and retrieval modes: retrieval and decoding chosen on validation
items only.

No personal adapter is trained. In inference mode each variant (retrieval.* / decoding.*
overrides) answers every sweep user's validation items (their most recent history items, exactly
the ones shared.selection holds out: `validation_size`) with base + base adapter under the
method's prompt, as `shared.selection.score` does. Retrieval mode needs no model: the prediction
is what the retrieved items themselves answered (`retrieved_answer`), a measure of how much a
retriever's items say about the answer. The users' queries are never read.

Per variant: the task metric pooled over users with a 95% bootstrap CI over users and the paired
difference against the first variant (shared.stats.compare_methods), and how often two validation
questions of one user are handed the same top retrieved item (`repeat`), with the share of
distinct items among all retrieved ones.

The choice: the variant with the best metric, unless others are not distinguishable from it
(their paired CI against it includes zero); among those, the one that repeats the same item
least, then the best metric. So a retriever or k is chosen for its metric when the data can tell,
and otherwise for not handing every question the same old item.
"""

from __future__ import annotations

import json
import logging
import time
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from shared.adapters import AdapterManifest
from shared.engine import Engine
from shared.fileio import atomic_write
from shared.metrics import METRIC_DIRECTION
from shared.model import load_base_model
from shared.personalize import METHOD_AUGMENTATION, Context, history_examples, population_base_examples, retrieve_for
from shared.retrieval import make_retriever
from shared.selection import validation_size
from shared.stats import compare_methods, pooled_scorer, resample_users, significant
from shared.tables import markdown_table

from .experiment import open_store
from .reports.run_outputs import signed4

log = logging.getLogger("oppu.sweep")


def run_inference_sweep(spec: Any, variants: Sequence[Any], dataset: Any, task: Any, users: Sequence[Any],
                        run_dir: Path, *, progress: bool = True) -> Path:
    """Score base + base adapter per variant on the users' validation items; write sweep.json/md."""
    from tqdm.auto import tqdm

    started = time.time()
    first = variants[0]
    engine = None if spec.mode == "retrieval" else _base_engine(spec, first, dataset, task, run_dir, progress)
    aug = METHOD_AUGMENTATION[spec.method]
    rows: dict[str, Any] = {}
    golds: list[list[str]] | None = None
    for v, exp in tqdm(list(zip(spec.variants, variants)), desc="sweep", disable=not progress, unit="variant"):
        t0 = time.time()
        retriever = make_retriever(exp.retrieval.retriever, task.item_text)
        if engine is not None:
            engine.decoding = exp.decoding
        prompts: list[str] = []
        budgets: list[int] = []
        preds: list[list[str]] = []
        retrieved: list[list[list[str]]] = []
        variant_golds: list[list[str]] = []
        for user in users:
            store = open_store(exp, run_dir / "stores", task)
            store.add(user.history)
            ctx = Context(store, retriever, exp.retrieval)
            examples = history_examples(task, user.history, ctx, aug)
            first_val = len(examples) - validation_size(len(examples), exp.selection)
            val = range(first_val, len(examples))
            found = [retrieve_for(task, ctx, task.item_to_example(user.history[i])[0], i) for i in val]
            retrieved.append([[it.id for it in items] for items in found] if aug != "plain" else [])
            variant_golds.append([examples[i].target for i in val])
            if engine is None:
                preds.append([retrieved_answer(task, items) for items in found])
                continue
            prompts += [examples[i].prompt for i in val]
            # The answer budget from the items before the held-out ones, as selection computes it.
            budgets += [engine.answer_tokens(task, examples[:first_val])] * len(val)
        answers: list[str] = []
        if engine is not None:
            answers = engine.answer(prompts, max_new_tokens=budgets, personal=False, task=task,
                                    progress="answering" if progress else False)
            parsed = iter(task.parse_output(a) for a in answers)
            preds = [[next(parsed) for _ in g] for g in variant_golds]
        golds = golds or variant_golds
        rows[v.name] = {"set": list(v.set), "preds": preds, "answers": answers, "retrieved": retrieved,
                        "repeat": repeat_rates(retrieved), "seconds": time.time() - t0}
        log.info("variant %s: %.0f s", v.name, rows[v.name]["seconds"])
    assert golds is not None
    metric = task.metric_names[0]
    table, choice = summarize_inference(rows, golds, task, metric)
    result = {"task": dataset.task, "mode": spec.mode, "method": spec.method, "metric": metric,
              "users": [u.user_id for u in users], "validation_items": sum(len(g) for g in golds),
              "base_adapter": None if engine is None else spec.base_adapter_dir or str(run_dir / "base_adapter"),
              "golds": golds, "variants": rows, "summary": table, "choice": choice,
              "seconds": time.time() - started}
    atomic_write(run_dir / "sweep.json", json.dumps(result, indent=2))
    atomic_write(run_dir / "sweep.md", render_inference_sweep(result))
    return run_dir


def retrieved_answer(task: Any, items: Sequence[Any]) -> str:
    """Retrieval mode's prediction, no model: what the retrieved items answered (the most common
    label, the rounded mean rating, the top item's text). It measures how much the items a
    retriever hands the prompt say about the answer; an empty retrieval answers ''."""
    answers = [task.item_to_example(it)[1] for it in items]
    if not answers:
        return ""
    if task.kind == "classification":
        return max(answers, key=answers.count)  # ties: the better-ranked item's label
    if task.kind == "regression":
        return str(int(np.floor(np.mean([float(a) for a in answers]) + 0.5)))
    return answers[0]


def _base_engine(spec: Any, first: Any, dataset: Any, task: Any, run_dir: Path, progress: bool) -> Engine:
    """The engine with the sweep's one base adapter (provide_base_adapter)."""
    engine = Engine(load_base_model(first.base_model), first.base_adapter, first.personal_adapter,
                    seed=first.personal_train.seed)
    # Variants share everything but retrieval and decoding, so one base adapter serves them all;
    # its training prompts retrieve as the first variant does.
    provide_base_adapter(engine, spec, first, dataset, task, run_dir, progress)
    return engine


def provide_base_adapter(engine: Engine, spec: Any, first: Any, dataset: Any, task: Any, run_dir: Path,
                         progress: bool) -> None:
    """Give `engine` the sweep's one base adapter: loaded from spec.base_adapter_dir (an earlier
    run's, so sweeps of one experiment compare against the model its table reports), or trained on
    the base users and saved into the sweep directory. Both sweep modes go through here."""
    if spec.base_adapter_dir:
        manifest = engine.load_base(Path(spec.base_adapter_dir))  # refuses another base model's adapter
        if manifest.task != task.name:
            raise ValueError(f"sweep.base_adapter_dir={spec.base_adapter_dir!r} holds a base adapter for task "
                             f"{manifest.task!r}, not {task.name!r}; name one trained for {task.name}")
        return
    examples = population_base_examples(task, first, dataset.base_users)
    trained = engine.train_base(examples, first.base_train, progress="base adapter" if progress else False)
    engine.save_base(run_dir / "base_adapter", AdapterManifest(
        role="base", base_model_hash=engine.model_hash, task=task.name, peft_type=first.base_adapter.peft_type,
        data={"users": len(dataset.base_users), "examples": len(examples)},
        train={"steps": trained.steps, "final_loss": trained.final_loss}))


def task_shaped(task: Any, prediction: str) -> bool:
    """Whether a parsed answer is one the task allows: a label, a whole rating on the scale (any
    text for generation). Anything else is scored as wrong (a rating as the worst one)."""
    if task.kind == "classification":
        return prediction in (task.labels or ())
    if task.kind == "regression":
        return prediction.isdigit() and task.scale[0] <= int(prediction) <= task.scale[1]
    return True


def repeat_rates(retrieved: Sequence[Sequence[Sequence[str]]]) -> list[dict[str, float]]:
    """Per user with at least two retrieving questions: the share of question pairs given the same
    top item (`same_top`), and distinct items among all items retrieved (`distinct`)."""
    out = []
    for per_question in retrieved:
        lists = [r for r in per_question if r]
        if len(lists) < 2:
            continue
        pairs = list(combinations(lists, 2))
        slots = [i for r in lists for i in r]
        out.append({"same_top": sum(a[0] == b[0] for a, b in pairs) / len(pairs),
                    "distinct": len(set(slots)) / len(slots)})
    return out


def _mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean over users and its 95% percentile bootstrap interval (users resampled)."""
    if not values:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    x = np.asarray(values, dtype=float)
    boots = x[resample_users(len(x), n_boot, seed)].mean(axis=1)
    return {"mean": float(x.mean()), "lo": float(np.quantile(boots, 0.025)), "hi": float(np.quantile(boots, 0.975))}


def summarize_inference(rows: dict[str, Any], golds: list[list[str]], task: Any,
                        metric: str) -> tuple[list[dict[str, Any]], str]:
    """Per variant: metric CI, paired gain vs the first variant and vs the best, repeat rates;
    and the choice (see the module docstring)."""
    names = list(rows)
    preds = {n: rows[n]["preds"] for n in names}
    sign = 1.0 if METRIC_DIRECTION.get(metric, "higher") == "higher" else -1.0
    scorer = pooled_scorer(task)
    first = compare_methods(scorer, preds, golds, [names[0]])
    best = max(names, key=lambda n: sign * first["ci"][n][metric]["mean"])
    vs_best = compare_methods(scorer, preds, golds, [best])["vs"][best]
    table = []
    for n in names:
        rr = rows[n]["repeat"]
        table.append({"variant": n, "set": rows[n]["set"], "metric": first["ci"][n][metric],
                      "vs_first": first["vs"][names[0]][n][metric], "vs_best": vs_best[n][metric],
                      "same_top": _mean_ci([r["same_top"] for r in rr]),
                      "distinct": _mean_ci([r["distinct"] for r in rr]),
                      "task_shaped": float(np.mean([task_shaped(task, p) for ps in preds[n] for p in ps])),
                      "seconds": rows[n]["seconds"]})
    # Not distinguishable from the best: the paired CI against it includes zero.
    tied = [r for r in table if r["variant"] == best or not significant(r["vs_best"])]

    def key(r: dict[str, Any]) -> tuple[float, float]:
        repeat = r["same_top"]["mean"]
        return (repeat if repeat == repeat else 0.0, -sign * r["metric"]["mean"])

    return table, min(tied, key=key)["variant"]


def render_inference_sweep(result: dict[str, Any]) -> str:
    metric = result["metric"]
    arrow = "↑" if METRIC_DIRECTION.get(metric, "higher") == "higher" else "↓"
    first = result["summary"][0]["variant"]

    def ci(d: dict[str, float], signed: bool = False) -> str:
        f = signed4 if signed else (lambda x: f"{x:.4f}")
        p = f" p={d['p']:.3f}" if "p" in d else ""
        key = "gain" if "gain" in d else "mean"
        return f"{f(d[key])} [{f(d['lo'])}, {f(d['hi'])}]{p}"

    rows = [[r["variant"] + (" **(chosen)**" if r["variant"] == result["choice"] else ""),
             " ".join(r["set"]) or "(config as is)", ci(r["metric"]),
             "(reference)" if r["variant"] == first else ci(r["vs_first"], True),
             ci(r["same_top"]) if r["same_top"]["mean"] == r["same_top"]["mean"] else "-",
             f"{r['distinct']['mean']:.2f}" if r["distinct"]["mean"] == r["distinct"]["mean"] else "-",
             f"{r['task_shaped']:.2f}", f"{r['seconds']:.0f}"] for r in result["summary"]]
    header = ["variant", "overrides", f"{metric} {arrow} [95% CI]", f"Δ{metric} vs {first} [95% CI]",
              "same top item [95% CI]", "distinct retrieved", "task-shaped", "s"]
    return "\n".join([
        f"# {result['mode'].capitalize()} sweep: {result['task']}, {result['method']} "
        f"{'with base + base adapter' if result['mode'] == 'inference' else 'answered by the retrieved items (no model)'}"
        f", {len(result['users'])} users, {result['validation_items']} validation items", "",
        markdown_table(header, rows), "",
        f"Validation = each user's most recent history items (selection.validation_fraction, as personal "
        f"selection holds them out); queries are never read. [95% CI]: bootstrap over users; Δ: paired gain on "
        f"the same items, positive = better, p: paired permutation test. 'same top item': per user, the share of "
        f"pairs of their validation questions given the same first retrieved item (lower = the retriever tells "
        f"questions apart); 'distinct retrieved': distinct items among all retrieved; 'task-shaped': answers "
        f"that parse as a label or a rating on the scale (all, for generation). Chosen: "
        f"**{result['choice']}** (among the variants whose paired CI against the best {metric} includes zero, the "
        f"one repeating the same item least, then the best {metric}). Wall time {result['seconds']:.0f} s.", ""])
