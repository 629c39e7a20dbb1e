"""Serving many users: answers/s for M concurrent users, each with their own personal adapter.

- mixed batch: one forward pass per batch over all users' rows (Engine.answer_users, PEFT's
  per-row adapter_names; each user's slot holds base ⊕ personal as one LoRA, as the one-user
  path's does);
- swap per request: load the user's personal adapter in place, answer that one request;
- single adapter: every row with one user's adapters, same batch size (the upper bound).

The M personal adapters are seeded random LoRA weights of a trained adapter's magnitude:
serving cost does not depend on what they learned, and training M of them would cost minutes.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from shared.adapters import PERSONAL, get_state
from shared.config import DataSpec
from shared.data import load_dataset
from shared.engine import Engine
from shared.personalize import prompt_for
from shared.tasks import get_task

from .training import base_spec, seeded_base_state


def run(users: int, task: str, repeats: int, model: str = "") -> dict:
    spec = base_spec("nf4", model)
    engine = Engine(spec)
    engine.set_base_state(seeded_base_state(engine.base_state()))
    ds = load_dataset(DataSpec(task=task, users=users, base_users=0, min_history=4, max_history=8, max_words=120,
                               queries=1))
    t = get_task(ds.task)
    prompts = [prompt_for(t, None, u.queries[0].input, "plain") for u in ds.eval_users][:users]
    names = [u.user_id for u in ds.eval_users][:users]
    shapes = get_state(engine.model, PERSONAL)
    states = {n: seeded_base_state(shapes, seed=100 + i, scale=0.02) for i, n in enumerate(names)}
    for n in names:
        engine.serve_user(n, states[n])
    kw = dict(max_new_tokens=t.max_new_tokens)
    m = len(prompts)

    def mixed() -> list[str]:
        return engine.answer_users(prompts, names, batch_size=m, **kw)

    def swap() -> list[str]:
        out = []
        for p, n in zip(prompts, names):
            engine.set_personal_state(states[n])
            out += engine.answer([p], personal=True, batch_size=1, **kw)
        return out

    def single() -> list[str]:
        engine.set_personal_state(states[names[0]])
        return engine.answer(prompts, personal=True, batch_size=m, **kw)

    results: dict[str, Any] = {}
    answers = {}
    engine.answer_users(prompts[:2], names[:2], batch_size=2, **kw)  # warm-up: first-call costs are not serving
    for name, fn in (("mixed_batch", mixed), ("swap_per_request", swap), ("single_adapter", single)):
        best = float("inf")
        for r in range(repeats):
            print(f"  [serving] {name} round {r + 1}/{repeats} ({m} users)", file=sys.stderr, flush=True)
            start = time.perf_counter()
            answers[name] = fn()
            if engine.base.device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        results[name] = {"seconds": best, "answers_per_second": m / best}
    agree = sum(a == b for a, b in zip(answers["mixed_batch"], answers["swap_per_request"]))
    # Untimed: one adapter's answers batched against the same adapter one request at a time. A row
    # of a mixed batch computes exactly what its user's adapter computes on that batch
    # (tests/shared/test_serving.py), but in bf16 the CPU's matmuls round differently for another
    # number of rows, so batching alone can change a greedy answer; this is how often it does.
    engine.set_personal_state(states[names[0]])
    alone = [engine.answer([p], personal=True, batch_size=1, **kw)[0] for p in prompts]
    batched_agree = sum(a == b for a, b in zip(answers["single_adapter"], alone))
    return {
        "users": m, "task": ds.task, "data_source": ds.source, "device": engine.base.device,
        "quantization": engine.base.quantization, "dtype": str(engine.base.dtype).replace("torch.", ""),
        "max_new_tokens": t.max_new_tokens, "repeats": repeats, **results,
        "mixed_equals_swap": f"{agree}/{m}", "batched_equals_alone": f"{batched_agree}/{m}",
        "mixed_vs_swap": results["mixed_batch"]["answers_per_second"] / results["swap_per_request"]["answers_per_second"],
        "mixed_vs_single": results["mixed_batch"]["answers_per_second"] / results["single_adapter"]["answers_per_second"],
    }
