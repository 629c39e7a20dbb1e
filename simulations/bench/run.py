"""The benchmark driver: runs each section in its own process, then writes bench/results.json
and bench/summary.md (every target with its measured figure and whether it was met)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from shared.fileio import atomic_write

from . import machine, summary

SECTIONS = ("memory", "footprint", "comms", "costmodel", "training", "serving", "scaling")


def one(job: str, args: argparse.Namespace) -> dict:
    """Run one job in this process (called in a child process by `main`)."""
    kind, *rest = job.split(":")
    if kind == "training":
        from . import training

        config, procedure = rest
        return training.run(config, procedure, args.users, args.task, args.epochs, args.model,
                            batch_tokens=args.batch_tokens, packing=args.packing == "on")
    if kind == "serving":
        from . import serving

        return serving.run(args.serve_users, args.task, args.repeats, args.model)
    if kind == "memory":
        from . import memory

        return memory.run(args.model)
    if kind == "footprint":
        from . import footprint

        return footprint.run(4, long=True, model=args.model)
    if kind == "comms":
        from . import comms

        return comms.run(args.model)
    if kind == "costmodel":
        from . import costcoeffs

        return costcoeffs.run(args.costmodel_config or None)
    if kind == "scaling":
        from . import scaling

        return scaling.run(int(rest[0]), args.model, Path(args.out))
    raise SystemExit(f"unknown bench job {job!r}")


def jobs(sections: list[str], args: argparse.Namespace) -> list[str]:
    """The jobs in the order that matters most if a run is cut short: the first training
    configuration (ours one user at a time, ours with all users in one pass, the reference), serving, memory, communication, the other
    training configurations, then simulation scaling."""
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    procedures = [p.strip() for p in args.procedures.split(",") if p.strip()]
    training = ([f"training:{c}:{p}" for c in configs for p in ("ours", "group", "reference") if p in procedures]
                if "training" in sections else [])
    first = len([p for p in ("ours", "group", "reference") if p in procedures])  # the first configuration's
    out = training[:first]
    out += [s for s in ("serving", "memory", "footprint", "comms", "costmodel") if s in sections]
    out += training[first:]
    if "scaling" in sections:
        out += [f"scaling:{n.strip()}" for n in args.scaling.split(",") if n.strip()]
    return out


def child(job: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "simulations.bench", "--one", job]
    for k in ("users", "task", "epochs", "model", "serve_users", "repeats", "out", "costmodel_config", "batch_tokens",
              "packing"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress) passes through
    line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
    if proc.returncode or line is None:  # recorded, and the other sections still run
        print(f"bench job {job} failed (exit {proc.returncode}); its output is above", flush=True)
        return {"error": f"exit {proc.returncode}", "job_seconds": time.perf_counter() - t0}
    result = json.loads(line[len("BENCH_JSON "):])
    result["job_seconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.bench")
    p.add_argument("--out", default="bench")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--configs", default="nf4,bf16", help="training base configurations (nf4, bf16, fp32)")
    p.add_argument("--users", type=int, default=2, help="users trained per procedure and configuration")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--procedures", default="ours,group,reference", help="training procedures to run")
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="training, ours and group: train.batch_tokens (0: batch 4 examples per step)")
    p.add_argument("--packing", choices=["on", "off"], default="off", help="training, ours and group: train.packing")
    p.add_argument("--task", default="amazon-rating")
    p.add_argument("--serve-users", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="serving: timed rounds per mode (best kept)")
    p.add_argument("--scaling", default="1,2,4,8,16", help="virtual-user counts for the simulation")
    p.add_argument("--costmodel-config", default="",
                   help="costmodel: the simulate config whose data and prompts are timed (default: simulate.toml)")
    p.add_argument("--model", default="", help="base model directory (default: the embedded model)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one job, print its JSON
    p.add_argument("--render", metavar="RESULTS_JSON", help="only (re)write summary.md from a results.json")
    args = p.parse_args(argv)
    if args.render:
        text = summary.render(json.loads(Path(args.render).read_text()))
        atomic_write(Path(args.render).with_name("summary.md"), text)
        print(text)
        return 0
    if args.one:
        print("BENCH_JSON " + json.dumps(one(args.one, args)), flush=True)
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        raise SystemExit(f"--sections: unknown {bad}; choose from {', '.join(SECTIONS)}")
    machine.matmul_flops("float32", seconds=1.0)  # warm-up: the first timed loop would catch the CPU ramping up
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine.describe(),
                     "bf16_matmul_flops_per_second": machine.matmul_flops("bfloat16", n=512, seconds=1.0),
                     "fp32_matmul_flops_per_second": machine.matmul_flops("float32", seconds=1.0),
                     "settings": {k: v for k, v in vars(args).items() if k != "one"}, "jobs": {}}
    out = Path(args.out)
    start = time.perf_counter()
    todo = jobs(sections, args)
    results["complete"] = False  # a cut-short run's partial results.json says so
    for i, job in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {job} (elapsed {time.perf_counter() - start:.0f} s)", flush=True)
        results["jobs"][job] = child(job, args)
        results["wall_seconds"] = time.perf_counter() - start
        atomic_write(out / "results.json", json.dumps(results, indent=2))  # partial results survive
    results["complete"] = True
    atomic_write(out / "results.json", json.dumps(results, indent=2))
    text = summary.render(results)
    atomic_write(out / "summary.md", text)
    print(text)
    print(f"written: {out / 'results.json'}, {out / 'summary.md'} in {time.perf_counter() - start:.0f} s")
    return 1 if any("error" in j for j in results["jobs"].values()) else 0
