"""Resident memory of one process serving users one after another, as `oppu experiment` and the
daemon do: load the base model, train the base adapter, then per user open a Chroma history
store, answer, train a personal adapter, answer again. It reports the process's RSS when idle
after loading, after base training and after each user, and its peak over the whole run.

    python -m simulations.bench.footprint [--users 4] [--dtype float32] [--long] [--check]

--long retrieves 8 long items per prompt, so training rows reach train.max_length (512 tokens):
the activation memory of LaMP-sized inputs. --check exits 1 when the process broke a limit: peak
above --max-peak-mb, RSS after the last user more than --max-growth-mb above RSS after the
first (memory must stay flat in the number of users), or RSS after a user more than
--max-idle-mb above RSS idle after loading (every call must hand its memory back).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.config import load_experiment
from shared.data import load_dataset
from shared.engine import Engine
from shared.personalize import Context, history_examples, population_base_examples, prompt_for
from shared.retrieval import make_retriever
from shared.tasks import get_task
from simulations.experiment import open_store

from .summary import FOOTPRINT_LIMITS_MB


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB (Linux /proc)."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def run(users: int = 4, *, dtype: str = "auto", long: bool = False, model: str = "", store: str = "chroma",
        history: int = 8, queries: int = 2, base_examples: int = 8) -> dict[str, Any]:
    overrides = [f"data.users={users}", "data.base_users=8", f"data.base_examples={base_examples}",
                 f"data.queries={queries}", f"data.min_history={history}", f"data.max_history={history}",
                 f'base_model.dtype="{dtype}"', "base_train.epochs=1", "personal_train.epochs=1",
                 "base_train.batch_size=4", "personal_train.batch_size=4", f'retrieval.store="{store}"']
    if model:
        overrides.append(f'base_model.path="{model}"')
    if long:
        overrides += ["data.max_words=120", "retrieval.k=8", "retrieval.item_max_words=120"]
    spec = load_experiment(None, overrides)
    dataset = load_dataset(spec.data)
    task = get_task(dataset.task)
    started = time.perf_counter()

    def mark() -> float:
        gc.collect()
        return round(rss_mb()[0], 1)

    engine = Engine(spec.base_model, spec.base_adapter, spec.personal_adapter, seed=0)
    out: dict[str, Any] = {"task": dataset.task, "source": dataset.source, "dtype": str(engine.base.dtype),
                           "long": long, "users": users, "rss_mb": {"loaded": mark()}}
    base = engine.train_base(population_base_examples(task, spec, dataset.base_users), spec.base_train, progress=False)
    out["rss_mb"]["base_trained"] = mark()
    retriever = make_retriever(spec.retrieval.retriever, task.item_text)
    lengths: list[int] = []
    per_user = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, user in enumerate(dataset.eval_users):
            store = open_store(spec, Path(tmp) / str(n), task)
            try:
                store.add(user.history)
                ctx = Context(store, retriever, spec.retrieval)
                prompts = [prompt_for(task, ctx, q.input, "rag") for q in user.queries]
                engine.answer(prompts, max_new_tokens=task.max_new_tokens, personal=False)
                examples = history_examples(task, user.history, ctx, "rag")
                lengths += [len(engine.tokenizer(e.prompt).input_ids) for e in examples]
                engine.train_personal(examples, spec.personal_train, progress=False)
                engine.answer(prompts, max_new_tokens=task.max_new_tokens, personal=True)
            finally:
                close = getattr(store, "close", None)
                if close is not None:
                    close()
            per_user.append(mark())
    out["rss_mb"]["after_user"] = per_user
    out["peak_mb"] = round(rss_mb()[1], 1)
    out["growth_mb"] = round(per_user[-1] - per_user[0], 1) if per_user else 0.0
    out["above_idle_mb"] = round(max(per_user, default=0.0) - out["rss_mb"]["loaded"], 1)
    out["prompt_tokens"] = {"max": max(lengths, default=0), "mean": round(sum(lengths) / max(1, len(lengths)))}
    out["base_steps"] = base.steps
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.bench.footprint", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--dtype", default="auto", help="compute dtype: auto | float32 | bfloat16")
    p.add_argument("--long", action="store_true", help="prompts of LaMP size (up to train.max_length)")
    p.add_argument("--model", default="", help="base model directory (default: the embedded model)")
    p.add_argument("--store", default="chroma", help="history store: chroma (as deployed) | memory")
    p.add_argument("--history", type=int, default=8, help="history items (training examples) per user")
    p.add_argument("--check", action="store_true", help="exit 1 when a limit below is broken")
    p.add_argument("--max-peak-mb", type=float, default=FOOTPRINT_LIMITS_MB["peak"])
    p.add_argument("--max-growth-mb", type=float, default=FOOTPRINT_LIMITS_MB["growth"])
    p.add_argument("--max-idle-mb", type=float, default=FOOTPRINT_LIMITS_MB["idle"])
    args = p.parse_args(argv)
    result = run(args.users, dtype=args.dtype, long=args.long, model=args.model, store=args.store,
                 history=args.history)
    broken = []
    if result["peak_mb"] > args.max_peak_mb:
        broken.append(f"peak {result['peak_mb']} MiB > {args.max_peak_mb}")
    if result["growth_mb"] > args.max_growth_mb:
        broken.append(f"grew {result['growth_mb']} MiB from the first user to the last > {args.max_growth_mb}")
    if result["above_idle_mb"] > args.max_idle_mb:
        broken.append(f"{result['above_idle_mb']} MiB above idle after a user > {args.max_idle_mb}")
    result["broken"] = broken
    print("FOOTPRINT_JSON " + json.dumps(result), flush=True)
    return 1 if args.check and broken else 0


if __name__ == "__main__":
    sys.exit(main())
