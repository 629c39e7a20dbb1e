"""`oppu reproduce RUN_DIR`: run again from a run directory's resolved config, into a new
directory, and compare every score with the original.

Everything that decides a result is in config.toml (data selection, model, adapters, training,
retrieval, privacy, federation, and the seeds of each). A rerun on the same machine and software
gives the same scores; the verdict lists any that differ by more than the tolerance. Timings are
not compared.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

from shared.config import load_experiment, load_federated
from shared.fileio import atomic_write
from shared.tables import markdown_table

from .ablation import load_ablation, run_ablation
from .experiment import run_experiment
from .simulate import simulate
from .studies import run_study


# Parts of metrics.json that are results (the rest is bookkeeping and timings).
COMPARED = ("aggregate", "per_user", "cells", "reference", "variants")
SKIPPED_LEAVES = ("seconds", "tokens_per_second")


def run_kind(run_dir: Path) -> str:
    info = run_dir / "run.json"
    if info.is_file():
        return json.loads(info.read_text()).get("kind", "experiment")
    return "simulate" if (run_dir / "federation.json").is_file() else "experiment"


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k not in SKIPPED_LEAVES:
                yield from _leaves(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix, float(node)


def scores(metrics: dict[str, Any]) -> dict[str, float]:
    return dict(kv for key in COMPARED if key in metrics for kv in _leaves(metrics[key], key))


def answers(run_dir: Path) -> dict[str, str]:
    """Every answer of a run (and of a study's member runs): '[variant/]method/query id' -> text."""
    root = Path(run_dir)
    out = {}
    for f in sorted([*root.glob("predictions/*.json"), *root.glob("*/predictions/*.json")]):
        prefix = f.parent.parent.relative_to(root).as_posix()
        for g in json.loads(f.read_text()).get("golds", []):
            out[f"{'' if prefix == '.' else prefix + '/'}{f.stem}/{g['id']}"] = g["output"]
    return out


def compare(original: dict[str, Any], rerun: dict[str, Any], tolerance: float = 0.0) -> dict[str, Any]:
    """Every score of `original` against `rerun`: which differ by more than `tolerance`.
    (`reproduce` also compares the answers themselves: see `answer_changes`.)"""
    a, b = scores(original), scores(rerun)
    rows, worst = [], 0.0
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x is None or y is None:
            rows.append({"score": k, "original": x, "rerun": y, "diff": None, "ok": False})
            continue
        same = x == y or (math.isnan(x) and math.isnan(y)) or (math.isinf(x) and x == y)
        diff = 0.0 if same else abs(x - y)
        worst = max(worst, diff)
        rows.append({"score": k, "original": x, "rerun": y, "diff": diff, "ok": same or diff <= tolerance})
    bad = [r for r in rows if not r["ok"]]
    return {"compared": len(rows), "differ": len(bad), "max_abs_diff": worst, "tolerance": tolerance,
            "reproduced": bool(rows) and not bad, "rows": rows}


def answer_changes(original: dict[str, str], rerun: dict[str, str]) -> dict[str, Any]:
    changed = sorted(k for k in set(original) | set(rerun) if original.get(k) != rerun.get(k))
    return {"answers": len(set(original) | set(rerun)), "changed": len(changed), "examples": changed[:5]}


def verdict(result: dict[str, Any]) -> str:
    if not result["compared"]:
        return "NOT REPRODUCED: the runs have no scores to compare"
    a = result.get("answers")
    tail = f"; {a['changed']} of {a['answers']} answers changed" if a and a["answers"] else ""
    if a and a["changed"] and result["reproduced"]:
        tail += " (scores still match)"
    if result["reproduced"]:
        how = "exactly" if result["max_abs_diff"] == 0 else f"within tolerance {result['tolerance']:g}"
        return (f"REPRODUCED: all {result['compared']} scores match {how} (largest difference "
                f"{result['max_abs_diff']:.3g}){tail}")
    return (f"NOT REPRODUCED: {result['differ']} of {result['compared']} scores differ by more than "
            f"{result['tolerance']:g} (largest difference {result['max_abs_diff']:.3g}){tail}")


def rerun(run_dir: Path, new_dir: Path, *, progress: bool = True) -> Path:
    """A fresh run of the same kind from `run_dir`'s config.toml, written to `new_dir`."""
    kind = run_kind(run_dir)
    config = run_dir / "config.toml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: {run_dir} is not a run directory")
    if kind == "experiment":
        return run_experiment(load_experiment(config), new_dir, progress=progress)
    if kind == "simulate":
        spec = load_federated(config, [f'federation.run_dir="{new_dir.resolve()}"'])
        return simulate(spec, new_dir)
    if kind == "ablation":
        return run_ablation(load_ablation(config), new_dir, progress=progress)
    if kind == "study":
        name = json.loads((run_dir / "study.json").read_text())["study"]
        # config.toml holds the shared settings (methods included); each variant's overrides go on top.
        return run_study(name, load_experiment(config), new_dir, methods_given=True, progress=progress)
    raise ValueError(f"{run_dir}: cannot rerun a run of kind {kind!r}")


def next_free(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def reproduce(run_dir: Path, new_dir: Path | None = None, *, tolerance: float = 0.0,
              progress: bool = True) -> tuple[Path, dict[str, Any]]:
    run_dir = Path(run_dir)
    original_file = run_dir / "metrics.json"
    if not original_file.is_file():
        raise FileNotFoundError(f"{original_file} does not exist: the run did not finish, nothing to compare")
    original = json.loads(original_file.read_text())
    new_dir = Path(new_dir) if new_dir else next_free(run_dir.with_name(run_dir.name + "-rerun"))
    out = rerun(run_dir, new_dir, progress=progress)
    result = compare(original, json.loads((out / "metrics.json").read_text()), tolerance)
    result["answers"] = answer_changes(answers(run_dir), answers(out))
    result["original"], result["rerun"] = str(run_dir), str(out)
    result["verdict"] = verdict(result)
    atomic_write(out / "reproduce.json", json.dumps(result, indent=2))
    return out, result


def render(result: dict[str, Any], limit: int = 20) -> str:
    shown = [r for r in result["rows"] if not r["ok"]][:limit] or result["rows"][:limit]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    table = markdown_table(["score", "original", "rerun", "|diff|"],
                           [[r["score"], fmt(r["original"]), fmt(r["rerun"]), fmt(r["diff"])] for r in shown])
    more = len(result["rows"]) - len(shown)
    return "\n".join([table] + ([f"({more} more scores not shown)"] if more > 0 else []) + ["", result["verdict"]])
