"""Personal-adapter training cost per user: ours vs the reference, for one base configuration.

Both procedures see the same users, examples, epochs, batch size and learning rate, start from
the same base model with the same (seeded) base adapter, and report the trained adapter's
answer-token loss on the user's examples (eval mode, no dropout) so final losses compare.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from shared.adapters import get_state, peft_config
from shared.config import AdapterSpec, BaseModelSpec, DataSpec, TrainSpec
from shared.data import load_dataset
from shared.devices import bf16_support, pick_device
from shared.engine import Engine
from shared.model import load_base_model
from shared.personalize import history_examples
from shared.tasks import get_task
from shared.training import answer_loss, collate, encode_examples

from . import machine
from .flops import Shape, training_flops
from .reference import merged_base, train_user

# name -> (quantization, preferred compute dtype); a dtype the hardware lacks falls back (below)
CONFIGS = {"nf4": ("nf4", "bfloat16"), "bf16": ("none", "bfloat16"), "fp32": ("none", "float32")}
# The reviewers with the most history, each cut to their 12 latest reviews (of at most 120 words):
# long enough that a user's training is mostly steps, short enough that `make bench` with both
# procedures and both base configurations stays well inside its 30 minutes on 2 cores.
USERS_SPEC = dict(min_history=12, max_history=12, max_words=120, queries=1)


def base_spec(config: str, model: str = ""):
    """BaseModelSpec for a configuration, with the compute dtype this hardware actually runs fast:
    bf16 only where it is computed in hardware; otherwise fp32 (noted in the results)."""
    quant, dtype = CONFIGS[config]
    spec = BaseModelSpec(quantization=quant, **({"path": model} if model else {}))
    device = pick_device(spec)
    if dtype == "bfloat16" and not bf16_support(device):
        dtype = "float32"
    return BaseModelSpec(quantization=quant, dtype=dtype, **({"path": model} if model else {}))


def bench_users(users: int, task: str) -> tuple[Any, list[tuple[str, list[Any]]]]:
    ds = load_dataset(DataSpec(task=task, users=users, base_users=0, **USERS_SPEC))
    t = get_task(ds.task)
    return ds, [(u.user_id, history_examples(t, u.history, None, "plain")) for u in ds.eval_users]


def seeded_base_state(state: dict, seed: int = 7, scale: float = 0.02) -> dict:
    """A fixed, non-zero base adapter (stands in for a trained one; same in both procedures)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * scale).to(v.dtype) for k, v in sorted(state.items())}


def _losses(model: Any, tokenizer: Any, examples: list, max_length: int, device: str) -> float:
    enc = encode_examples(tokenizer, examples, max_length)
    model.eval()
    with torch.no_grad():
        vals = [float(answer_loss(model, *collate(enc, [i], tokenizer.pad_token_id, device))) for i in range(len(enc))]
    return sum(vals) / len(vals)


def run(config: str, procedure: str, users: int, task: str, epochs: float, model: str = "", *,
        batch_tokens: int = 0, packing: bool = False) -> dict:
    spec = base_spec(config, model)
    # batch_tokens / packing: ours only (the reference is the published procedure, as it is)
    train = TrainSpec(epochs=epochs, lr=1e-4, batch_size=4, batch_tokens=batch_tokens, packing=packing)
    personal = AdapterSpec()
    ds, data = bench_users(users, task)

    t0 = time.perf_counter()
    loaded = load_base_model(spec)
    load_s = time.perf_counter() - t0
    compute = str(loaded.dtype).replace("torch.", "")  # utilization is against this dtype's matmul
    mm_before = machine.matmul_flops(compute)
    device, tok = loaded.device, loaded.tokenizer
    rows = []
    if procedure == "ours":
        engine = Engine(loaded, AdapterSpec(), personal)
        engine.set_base_state(seeded_base_state(engine.base_state()))
        for i, (user, examples) in enumerate(data):
            print(f"  [{config} ours] user {i + 1}/{len(data)}: {len(examples)} examples", file=sys.stderr, flush=True)
            start = time.perf_counter()
            r = engine.train_personal(examples, train, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            losses = engine.example_losses(examples, personal=True, max_length=train.max_length)
            loss = sum(losses) / len(losses)
            rows.append(_row(user, examples, seconds, loss, r.steps))
    elif procedure == "group":  # every user's adapter in one pass (shared.group_training)
        engine = Engine(loaded, AdapterSpec(), personal)
        engine.set_base_state(seeded_base_state(engine.base_state()))
        print(f"  [{config} group] {len(data)} users in one pass", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results, states = engine.train_personal_group([ex for _, ex in data], train, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        for (user, examples), r, state in zip(data, results, states):
            engine.set_personal_state(state, label=None)
            losses = engine.example_losses(examples, personal=True, max_length=train.max_length)
            # the pass's time shared by its users in proportion to their examples
            share = seconds * len(examples) / sum(len(ex) for _, ex in data)
            rows.append(_row(user, examples, share, sum(losses) / len(losses), r.steps))
        engine.reset_personal()
    else:
        torch.manual_seed(0)
        from peft import get_peft_model

        probe = get_peft_model(loaded.model, peft_config(AdapterSpec()))
        state = seeded_base_state(get_state(probe, "default"))
        base_model = probe.unload()
        merged = merged_base(base_model, AdapterSpec(), state)
        for i, (user, examples) in enumerate(data):
            print(f"  [{config} reference] user {i + 1}/{len(data)}: {len(examples)} examples", file=sys.stderr, flush=True)
            pm, seconds = train_user(merged, tok, examples, personal, train, device=device,
                                     bf16=loaded.dtype == torch.bfloat16)
            loss = _losses(pm, tok, examples, train.max_length, device)
            steps = len(examples) // train.batch_size + (len(examples) % train.batch_size > 0)
            rows.append(_row(user, examples, seconds, loss, int(steps * epochs)))
            merged = pm.unload()
    mm_after = machine.matmul_flops(compute)
    shape = Shape.of(loaded.model.config)
    for (user, examples), row in zip(data, rows):
        enc = encode_examples(tok, examples, train.max_length)
        seqs = [(len(e.input_ids), len(e.input_ids) - e.n_prompt) for e in enc]
        row["useful_tokens"] = int(epochs * sum(n for n, _ in seqs))
        row["flops"] = epochs * training_flops(shape, seqs, lora_r=personal.r, lora_targets=personal.target_modules)
        row["tokens_per_second"] = row["useful_tokens"] / row["seconds"]
    secs = sum(r["seconds"] for r in rows)
    out = {
        "config": config, "procedure": procedure, "quantization": loaded.quantization,
        "batch_tokens": batch_tokens, "packing": packing,
        "dtype": str(loaded.dtype).replace("torch.", ""), "device": device, "task": ds.task,
        "data_source": ds.source, "epochs": epochs, "batch_size": train.batch_size, "load_seconds": load_s,
        "model_resident_bytes": int(loaded.model.get_memory_footprint()), "peak_rss_bytes": machine.peak_rss(),
        "users": rows, "mean_seconds_per_user": secs / len(rows),
        "tokens_per_second": sum(r["useful_tokens"] for r in rows) / secs,
        "flops_per_second": sum(r["flops"] for r in rows) / secs,
        "matmul_flops_per_second": (mm_before + mm_after) / 2, "matmul_samples": [mm_before, mm_after],
        "final_loss": sum(r["final_loss"] for r in rows) / len(rows),
    }
    if device == "cuda":
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def _row(user: str, examples: list, seconds: float, loss: float, steps: int) -> dict:
    return {"user": user, "examples": len(examples), "steps": steps, "seconds": seconds, "final_loss": loss}
