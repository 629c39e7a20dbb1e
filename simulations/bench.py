"""`make bench`: personal-adapter training cost per user, for nf4 and bf16 bases.

Each configuration runs in its own process so its peak memory is its own. Figures are what this
run measured on this machine; the summary states the machine.

    python -m simulations.bench --out bench [--users 3] [--configs nf4,bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    # name: (quantization, dtype)
    "nf4": ("nf4", "auto"),
    "bf16": ("none", "bfloat16"),
    "fp32": ("none", "float32"),
}


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_one(name: str, users: int, task: str, model: str = "") -> dict:
    """Train one personal adapter per user on a fresh process; report per-user figures."""
    import torch

    from shared.config import BaseModelSpec, DataSpec, RetrievalSpec, TrainSpec
    from shared.engine import Engine
    from shared.personalize import Context, history_examples
    from shared.retrieval import InMemoryHistoryStore, make_retriever
    from shared.tasks import get_task
    from simulations.datasets import load_dataset

    quant, dtype = CONFIGS[name]
    t0 = time.perf_counter()
    engine = Engine(BaseModelSpec(quantization=quant, dtype=dtype, **({"path": model} if model else {})))
    load_s = time.perf_counter() - t0
    ds = load_dataset(DataSpec(task=task, users=users, base_users=0, min_history=18, max_history=35,
                               max_words=120, queries=1))
    t = get_task(ds.task)
    spec = TrainSpec(epochs=2, lr=1e-4, batch_size=4)
    rows = []
    for user in ds.eval_users:
        store = InMemoryHistoryStore(t.item_text)
        store.add(user.history)
        ctx = Context(store, make_retriever("bm25", t.item_text), RetrievalSpec(k=0, store="memory"))
        examples = history_examples(t, user.history, ctx, "plain")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        r = engine.train_personal(examples, spec, progress=False)
        rows.append({"user": user.user_id, "examples": len(examples), "steps": r.steps,
                     "seconds": r.seconds, "useful_tokens": r.useful_tokens,
                     "tokens_per_second": r.tokens_per_second, "final_loss": r.final_loss})
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "config": name, "quantization": engine.base.quantization, "dtype": str(engine.base.dtype),
        "device": engine.base.device, "task": ds.task, "data_source": ds.source,
        "model_resident_bytes": int(engine.base.model.get_memory_footprint()),
        "load_seconds": load_s, "peak_rss_bytes": peak_rss, "users": rows,
        "mean_seconds_per_user": sum(r["seconds"] for r in rows) / max(1, len(rows)),
        "tokens_per_second": sum(r["useful_tokens"] for r in rows) / max(1e-9, sum(r["seconds"] for r in rows)),
    }
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def summary(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# oppu benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"device {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}.",
        f"Measured {results['date']}; each configuration in its own process.",
        "",
        "## Personal-adapter training cost per user",
        "",
        "LoRA r=8 on q_proj/v_proj, 2 epochs, batch 4, answer-only loss, history = the user's own items.",
        "",
        "| base | device | s / user | useful tokens/s | peak RSS | model resident | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["training"]:
        loss = sum(u["final_loss"] for u in r["users"]) / max(1, len(r["users"]))
        lines.append(
            f"| {r['config']} ({r['quantization']}, {r['dtype'].replace('torch.', '')}) | {r['device']} | "
            f"{r['mean_seconds_per_user']:.1f} | {r['tokens_per_second']:.0f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB | {r['model_resident_bytes'] / 2**20:.0f} MiB | {loss:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.bench")
    p.add_argument("--out", default="bench")
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--task", default="amazon-rating")
    p.add_argument("--configs", default="nf4,bf16")
    p.add_argument("--model", default="", help="base model directory (default: the embedded model)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = p.parse_args(argv)
    if args.one:
        print("BENCH_JSON " + json.dumps(run_one(args.one, args.users, args.task, args.model)))
        return 0
    from shared.fileio import atomic_write

    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "training": []}
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
        print(f"benchmarking personal-adapter training on a {name} base ...", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "simulations.bench", "--one", name, "--users", str(args.users),
             "--task", args.task, "--model", args.model], capture_output=True, text=True,
        )
        line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"benchmark {name} failed (exit {proc.returncode})")
        results["training"].append(json.loads(line[len("BENCH_JSON "):]))
    out = Path(args.out)
    atomic_write(out / "results.json", json.dumps(results, indent=2))
    text = summary(results)
    atomic_write(out / "summary.md", text)
    print(text)
    print(f"written: {out / 'results.json'}, {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
