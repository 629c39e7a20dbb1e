"""`oppu report RUN_DIR [RUN_DIR ...]`: one Markdown page for one run or several side by side.

Works for every kind of run directory (experiment, simulate, study, ablation): each one holds
metrics.md (its tables), plots/*.png and config.toml. With several runs the page starts with a
comparison: the settings that differ between them and each method's score in each run.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Sequence

from shared.fileio import atomic_write
from shared.metrics import METRIC_DIRECTION
from shared.tables import markdown_table

from .run_outputs import all_aggregate, all_methods


PLOT_ORDER = ("methods.png", "levels.png", "rounds.png", "tradeoff.png")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}); the run may not have finished") from None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if not (run_dir / "metrics.md").is_file() and not (run_dir / "metrics.json").is_file():
        raise ValueError(f"{run_dir} has no metrics.md or metrics.json: not a finished run directory "
                         "(written by oppu experiment, simulate, study or ablate)")


def _link(target: Path, out: Path) -> str:
    return Path(os.path.relpath(target.resolve(), out.resolve().parent)).as_posix()


def _demote(markdown: str) -> str:
    """Headings one level down, so a run's own tables nest under its section."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def _comparison(runs: Sequence[Path]) -> list[str]:
    configs = {}
    for r in runs:
        try:
            configs[r] = _flat(tomllib.loads((r / "config.toml").read_text()))
        except (FileNotFoundError, tomllib.TOMLDecodeError):
            configs[r] = {}
    keys = sorted({k for c in configs.values() for k in c})
    differ = [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1
              and not k.endswith(("run_dir", "out_dir", "client_cache"))]
    lines = ["## Comparison", ""]
    if differ:
        rows = [[r.name] + [str(configs[r].get(k, "-")) for k in differ] for r in runs]
        lines += ["Settings that differ:", "", markdown_table(["run"] + differ, rows), ""]
    metrics = {r: _read_json(r / "metrics.json") for r in runs}
    # Each run's methods, then its non-LLM baselines; a cell keeps the run's 95% CI over users.
    methods = [m for r in runs if metrics[r].get("methods") for m in all_methods(metrics[r])]
    methods = list(dict.fromkeys(methods))
    aggregates = {r: all_aggregate(metrics[r]) if metrics[r].get("aggregate") else {} for r in runs}
    names = {n for r in runs for a in aggregates[r].values() for n in a}
    for n in sorted(names):
        rows = [[r.name] + [_cell(metrics[r], aggregates[r], m, n) for m in methods] for r in runs]
        arrow = "↑" if METRIC_DIRECTION.get(n, "higher") == "higher" else "↓"
        lines += [f"{n} {arrow} by method (pooled [95% CI over users]):", "", markdown_table(["run"] + methods, rows), ""]
    return lines


def _cell(metrics: dict[str, Any], aggregate: dict[str, Any], method: str, metric: str) -> str:
    if method not in aggregate or metric not in aggregate[method]:
        return "-"
    ci = metrics.get("stats", {}).get("ci", {}).get(method, {}).get(metric)
    return f"{ci['mean']:.4f} [{ci['lo']:.4f}, {ci['hi']:.4f}]" if ci else f"{aggregate[method][metric]:.4f}"


def render(run_dirs: Sequence[Path], out: Path) -> str:
    """The Markdown page for `run_dirs`; image links are relative to where `out` will be."""
    runs = [Path(r) for r in run_dirs]
    for r in runs:
        check_run_dir(r)
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs side by side"
    lines = [f"# Report: {title}", ""]
    if len(runs) > 1:
        lines += _comparison(runs)
    for r in runs:
        info = _read_json(r / "run.json")
        data = _read_json(r / "data.json")
        lines += [f"## {r.name}" if len(runs) > 1 else "## Run", "",
                  f"Kind: {info.get('kind', 'experiment')}; directory: `{r}`"
                  + (f"; wall time {info['seconds']:.0f} s" if info.get("seconds") else "")
                  + (" (of the last invocation only: the run was resumed)" if info.get("resumed") else ""), ""]
        if data.get("source"):
            lines += [f"Data: {data.get('task', '')} from {data['source']}"]
            lines += [f"Note: {n}" for n in data.get("notes", [])]
            lines += [""]
        md = r / "metrics.md"
        if md.is_file():
            body = md.read_text()
            lines += [_demote(body) if len(runs) > 1 else body, ""]
        pngs = sorted((r / "plots").glob("*.png"), key=lambda p: (PLOT_ORDER.index(p.name)
                                                                  if p.name in PLOT_ORDER else 99, p.name))
        for p in pngs:
            lines += [f"![{r.name}: {p.stem}]({_link(p, out)})", ""]
        if (r / "config.toml").is_file():
            lines += [f"Resolved configuration: [{_link(r / 'config.toml', out)}]({_link(r / 'config.toml', out)}); "
                      f"rerun and compare with `oppu reproduce {r}`.", ""]
    return "\n".join(lines)


def write_report(run_dirs: Sequence[Path], out: Path | None = None) -> Path:
    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise ValueError("give at least one run directory")
    out = Path(out) if out else (runs[0] / "REPORT.md" if len(runs) == 1 else Path("report.md"))
    atomic_write(out, render(runs, out))
    return out
