"""`make quality`: both real tasks on 40+ reviewers each, written up as docs/quality.md.

Runs `oppu experiment` once per config (default: simulations/configs/quality-amazon-*.toml,
the dataclass defaults' personal recipe), side by side (one process per config, the cores shared
out as torch threads; on a 2-core CPU two one-thread runs finish well before two two-thread runs
one after the other; when a run finishes, those still running take over its cores from their next
user on), then writes one page: the machine and wall time,
each task's results table (CIs over users, paired differences, non-LLM baselines, adoption),
the claims the project makes checked against those numbers, and the recipe sweep behind the
defaults (docs/sweep-*.md, written by `oppu sweep`).

    python -m simulations.quality --out docs/quality.md [--config A.toml --config B.toml] [--set k=v] [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from shared.config import BaseModelSpec, load_experiment
from shared.devices import pick_dtype, set_threads
from shared.fileio import atomic_write

from .experiment import run_experiment
from .reports.run_outputs import signed4

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("oppu.quality")
DEFAULT_CONFIGS = (ROOT / "simulations" / "configs" / "quality-amazon-title.toml",
                   ROOT / "simulations" / "configs" / "quality-amazon-rating.toml")


def machine() -> str:
    """CPU model, the matrix units this project's dtype choice depends on, cores, torch."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown CPU", "", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    units = "AMX (bf16 in hardware)" if "amx_bf16" in flags else ("AVX512-BF16" if "avx512_bf16" in flags else
                                                                 "AVX2 only (fp32 compute)" if "avx2" in flags else "?")
    import torch

    dtype = str(pick_dtype(BaseModelSpec(), "cpu")).replace("torch.", "")
    return (f"{model}, {units}, {len(os.sched_getaffinity(0))} cores; torch {torch.__version__}, "
            f"compute dtype {dtype}")


def claims(metrics: Mapping[str, Any]) -> list[str]:
    """The quality claims, each checked against this run's numbers (met / NOT met)."""
    stats = metrics.get("stats") or {}
    metric = stats.get("metric") or next(iter(next(iter(metrics["aggregate"].values()))))
    vs = stats.get("vs", {})

    def diff(method: str, ref: str) -> Mapping[str, float] | None:
        return vs.get(ref, {}).get(method, {}).get(metric)

    def fmt(d: Mapping[str, float] | None) -> str:
        return "n/a" if d is None else f"{signed4(d['gain'])} [{signed4(d['lo'])}, {signed4(d['hi'])}], p={d['p']:.3f}"

    out = []
    rag, npz = diff("OPPU+RAG", "RAG"), diff("OPPU+RAG", "non-personalized")
    if rag is not None and npz is not None:
        ok = rag["gain"] >= 0 and npz["gain"] > 0
        sig = (rag["lo"] > 0) or (npz["lo"] > 0)
        out.append(f"- OPPU+RAG at least as good as RAG ({fmt(rag)}) and better than non-personalized "
                   f"({fmt(npz)}): **{'met' if ok else 'NOT met'}**; a paired CI excluding zero: "
                   f"**{'yes' if sig else 'no'}**.")
    oppu = diff("OPPU", "non-personalized")
    if oppu is not None:
        out.append(f"- OPPU no worse than non-personalized ({fmt(oppu)}): "
                   f"**{'met' if oppu['gain'] >= 0 else 'NOT met'}**.")
    below = stats.get("below_best_baseline") or []
    best = stats.get("best_baseline")
    if best:
        flagged = [m for m in metrics["methods"] if m in below]
        out.append(f"- Every LLM method above the best non-LLM baseline ({best}) or flagged: "
                   + (f"flagged below it: {', '.join(flagged)}." if flagged else "all above it."))
    adoption = metrics.get("adoption") or {}
    if adoption:
        out.append("- Personal adapters adopted on validation: "
                   + "; ".join(f"{m} {a['adopted']}/{a['users']}" for m, a in adoption.items()) + ".")
    return out


def render(runs: list[tuple[Path, Mapping[str, Any], float]], total: float, who: str, note: str = "") -> str:
    lines = ["# Quality: do personal adapters make the model better for their user?", "",
             f"Written by `make quality` ({who}). Machine: {machine()}. Wall time {total / 60:.1f} min in all."
             + (f" {note}" if note else ""), "",
             "Each task: real Amazon reviewers (Musical Instruments 5-core), each one's earlier reviews as "
             "history and their most recent reviews as queries; the base adapter is trained on other reviewers. "
             "Personal adapters go through per-user validation (each user's most recent history items held "
             "out; an adapter is adopted only when it beats base + base adapter there, else the method answers "
             "as its non-personal counterpart, unless a task's config always adopts the last checkpoint: "
             "`[selection] adopt = \"last\"`, validation still scored). Settings were chosen on validation items only (the recipe "
             "sweep below), never on the queries reported here.", ""]
    for run_dir, metrics, seconds in runs:
        data = json.loads((run_dir / "data.json").read_text())
        lines += [f"## {metrics['task']} ({data['eval_users']} users, {data['queries']} queries, "
                  f"{seconds / 60:.1f} min)", ""]
        table = (run_dir / "results.md").read_text().split("\n", 1)[1].strip()
        lines += [table, "", "Claims checked on these numbers:", ""] + claims(metrics) + [
            "", f"Run directory (not committed): `{run_dir}`.", ""]
    sweeps = sorted((ROOT / "docs").glob("sweep-*.md"))
    lines += ["## The recipe behind the defaults", ""]
    if sweeps:
        lines += ["`oppu sweep` compared personal recipes, retrievers and decoding on the sweep users' held-out "
                  "history items; the defaults in shared/config/specs.py are the choice (the paper's recipe stays "
                  "available as `--preset paper`).", ""]
        for s in sweeps:  # each page's title becomes a subsection here
            text = s.read_text()
            lines += ["##" + text if text.startswith("# ") else text, ""]
    else:
        lines += ["No sweep results in docs/ (run `make sweep`).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", help="experiment TOML (repeatable; default: both quality configs)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every run")
    p.add_argument("--out", default="docs/quality.md", help="page to write")
    p.add_argument("--runs", default="runs/quality", help="parent directory of the run directories")
    p.add_argument("--from-runs", nargs="+", metavar="RUN_DIR", default=[],
                   help="write the page from finished run directories instead of running (e.g. the two tasks run "
                   "side by side, one process each); the wall time is then --wall-minutes")
    p.add_argument("--wall-minutes", type=float, help="with --from-runs: the wall time of all runs together")
    p.add_argument("--note", default="", help="a sentence for the page's header (how the runs were made)")
    p.add_argument("--jobs", type=int, default=0,
                   help="runs side by side, one process each (default: all configs at once; 1: one after the other)")
    p.add_argument("--child", metavar="FILE", help=argparse.SUPPRESS)  # one run of a side-by-side parent
    p.add_argument("--threads-file", metavar="FILE", help=argparse.SUPPRESS)  # the child's torch threads, from its parent
    args = p.parse_args(argv)
    given = list(argv if argv is not None else sys.argv[1:])
    if "--note" in given:  # the note is printed after the machine, not in the command
        at = given.index("--note")
        del given[at : at + 2]
    who = "python -m simulations.quality " + " ".join(given)

    if args.from_runs:
        done = []
        for d in map(Path, args.from_runs):
            metrics_file = d / "metrics.json"
            if not metrics_file.is_file():
                p.error(f"{d} is not a finished run directory (no metrics.json); give the directories "
                        f"`make quality` printed, e.g. runs/quality/<time>-amazon-title")
            metrics = json.loads(metrics_file.read_text())
            done.append((d, metrics, float(metrics["seconds"])))
        total = 60 * args.wall_minutes if args.wall_minutes else sum(r[2] for r in done)
        atomic_write(Path(args.out), render(done, total, who.strip(), args.note))
        print(f"wrote {args.out}")
        return 0

    configs = args.config or [str(c) for c in DEFAULT_CONFIGS]
    sets = [f'out_dir="{args.runs}"', *args.set]
    if args.child:  # one run for a side-by-side parent: its run directory goes to the file named
        follow = follow_threads(Path(args.threads_file)) if args.threads_file else None
        run_dir = run_experiment(load_experiment(configs[0], sets), progress=True, between_users=follow)
        atomic_write(Path(args.child), str(Path(run_dir).resolve()))
        return 0
    for config in configs:  # a bad config fails here, before any run starts
        load_experiment(config, sets)
    started = time.time()
    jobs = max(1, min(args.jobs or len(configs), len(configs)))
    if jobs == 1:
        runs = []
        for config in configs:
            run_dir = run_experiment(load_experiment(config, sets), progress=True)
            runs.append((run_dir, json.loads((run_dir / "metrics.json").read_text())))
            print((run_dir / "results.md").read_text())
        note = args.note
    else:
        runs, note = side_by_side(configs, args, jobs)
    done = [(d, m, float(m["seconds"])) for d, m in runs]
    atomic_write(Path(args.out), render(done, time.time() - started, who.strip(), note))
    print(f"wrote {args.out}")
    return 0


def follow_threads(path: Path) -> Callable[[], None]:
    """A side-by-side child's between-users hook: take the torch threads its parent last wrote to
    `path` (the parent raises them when another run finishes and frees its cores)."""

    def check() -> None:
        import torch

        try:
            wanted = int(path.read_text().strip())
        except (OSError, ValueError):
            return  # no word from the parent (yet): keep what we have
        if wanted > 0 and wanted != torch.get_num_threads():
            log.info("torch threads %d -> %d (a run beside this one finished)", torch.get_num_threads(), wanted)
            set_threads(wanted)

    return check


def thread_shares(cores: int, running: int, floor: int) -> int:
    """Torch threads for each of `running` runs on `cores` cores, never below `floor` (what
    each was started with)."""
    return max(floor, cores // max(1, running))


@dataclass
class _Child:
    """One side-by-side run in progress."""

    proc: Any
    stem: str
    log: Path  # its console output
    out: Path  # where it writes its run directory when done
    share: Path  # where the parent writes its torch threads (follow_threads reads it)
    threads: int


def side_by_side(configs: list[str], args: argparse.Namespace, jobs: int) -> tuple[list, str]:
    """Each config in its own process, `jobs` at a time, the cores shared out as torch threads;
    each process logs to <runs>/<config>.log. Once no config waits, a finished run's cores go to
    the runs still going (from their next user on: follow_threads). Returns the finished runs in
    config order and a sentence for the page saying how they ran."""
    from tqdm.auto import tqdm

    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // jobs)
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    # The children run where the parent runs (relative --config, --runs and --set paths mean the
    # same to them), importing this checkout.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    pending, running, finished = list(enumerate(configs)), {}, {}
    handed: list[str] = []  # e.g. "quality-amazon-rating went on with 2 after quality-amazon-title finished"
    stems = [Path(c).stem for c in configs]
    with tqdm(total=len(configs), desc=f"quality runs ({jobs} side by side, {threads} thread(s) each)",
              unit="run") as bar:
        while pending or running:
            while pending and len(running) < jobs:
                i, config = pending.pop(0)
                stem = Path(config).stem if stems.count(Path(config).stem) == 1 else f"{Path(config).stem}-{i + 1}"
                runs = Path(args.runs)
                child = _Child(None, stem, runs / f"{stem}.log", runs / f".{stem}.run_dir", runs / f".{stem}.threads",
                               threads)
                child.out.unlink(missing_ok=True)
                atomic_write(child.share, str(threads))
                cmd = [sys.executable, "-m", "simulations.quality", "--config", config, "--runs", args.runs,
                       "--child", str(child.out), "--threads-file", str(child.share)]
                cmd += [a for s in args.set for a in ("--set", s)]
                with child.log.open("w") as f:
                    child.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
                running[i] = child
                bar.write(f"started {stem} (log: {child.log})")
            time.sleep(5)
            for i, child in list(running.items()):
                if child.proc.poll() is None:
                    continue
                del running[i]
                child.share.unlink(missing_ok=True)
                if child.proc.returncode != 0 or not child.out.is_file():
                    for other in running.values():
                        other.proc.terminate()
                        other.share.unlink(missing_ok=True)
                    tail = child.log.read_text(errors="replace")[-3000:]
                    raise SystemExit(f"{configs[i]} failed (exit {child.proc.returncode}); "
                                     f"the end of {child.log}:\n{tail}")
                run_dir = Path(child.out.read_text().strip())
                child.out.unlink()
                finished[i] = (run_dir, json.loads((run_dir / "metrics.json").read_text()))
                bar.write((run_dir / "results.md").read_text())
                bar.update(1)
                if pending or not running:
                    continue  # a waiting config takes the freed cores (or nothing is left to take them)
                n = thread_shares(cores, len(running), threads)
                for other in running.values():
                    if n > other.threads:
                        other.threads = n
                        atomic_write(other.share, str(n))
                        handed.append(f"{other.stem} went on with {n} after {child.stem} finished")
                        bar.write(f"{other.stem}: {n} torch threads from its next user on")
    note = (f"The {len(configs)} tasks ran side by side ({jobs} processes, {threads} torch thread(s) each"
            + (f"; {', '.join(handed)}" if handed else "") + "); "
            "each task's own time is in its heading." + (f" {args.note}" if args.note else ""))
    return [finished[i] for i in range(len(configs))], note


if __name__ == "__main__":
    raise SystemExit(main())
