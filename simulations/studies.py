"""`oppu study NAME`: the OPPU paper's further studies, each one command, each a set of
`oppu experiment` runs (in-process: these studies are about personalization, not federation)
collected in one study directory with a comparison table and plot.

- activity: users drawn equally from the low/medium/high tertiles of history size; the gain of
  each method over non-personalized per level (paper: users with different activity levels).
- shift: behaviour shift; every user keeps the half of their history whose words are most like
  their queries ("similar") or least like them ("shifted"), for retrieval and for training.
- format: history format; retrieved records written as the task's sentence, as JSON, or as
  "key: value" fields, in training and at inference (OPPU without retrieval is the control).
- peft: the personal adapter's PEFT type: LoRA, IA3, prompt tuning.

study_dir/: study.json (the variants and their overrides), config.toml (the shared settings),
<variant>/ (a complete experiment run directory each), metrics.json, metrics.md,
plots/study.png (+ plots/levels.png for activity), run.json, REPORT.md.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from shared.adapters import FRAMEWORK_VERSION
from shared.config import ExperimentSpec, apply_overrides, dump_toml, from_dict, to_dict
from shared.fileio import atomic_write
from shared.rundir import new_run_dir
from shared.tables import markdown_table

from .experiment import run_experiment
from .reports import plots
from .reports.page import render
from .reports.run_outputs import primary_metric


# name -> (what it shows, default methods, {variant: overrides})
STUDIES: dict[str, tuple[str, tuple[str, ...], dict[str, list[str]]]] = {
    "activity": ("gain over non-personalized by user activity level (tertiles of history size)",
                 ("non-personalized", "RAG", "OPPU", "OPPU+RAG"),
                 {"by-activity": ['data.select="activity"']}),
    "shift": ("behaviour shift: history like the queries vs history of other topics",
              ("non-personalized", "RAG", "OPPU", "OPPU+RAG"),
              {"similar": ['data.history_topics="similar"'], "shifted": ['data.history_topics="shifted"']}),
    "format": ("robustness to the format of history records in prompts",
               ("non-personalized", "RAG", "OPPU", "OPPU+RAG"),
               {"template": ['retrieval.item_format="template"'], "json": ['retrieval.item_format="json"'],
                "fields": ['retrieval.item_format="fields"']}),
    "peft": ("personal adapter PEFT type", ("non-personalized", "OPPU"),
             {"lora": ['personal_adapter.peft_type="lora"'], "ia3": ['personal_adapter.peft_type="ia3"'],
              "prompt_tuning": ['personal_adapter.peft_type="prompt_tuning"']}),
}


def study_specs(name: str, spec: ExperimentSpec, methods_given: bool) -> dict[str, ExperimentSpec]:
    """The experiment spec of each variant of study `name`, built on `spec`."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose from {', '.join(STUDIES)}")
    _, methods, variants = STUDIES[name]
    base = to_dict(spec)
    if not methods_given:
        base["methods"] = list(methods)
    return {v: from_dict(ExperimentSpec, apply_overrides(base, ov)) for v, ov in variants.items()}


def run_study(name: str, spec: ExperimentSpec, study_dir: Path | None = None, *, methods_given: bool = False,
              progress: bool = True) -> Path:
    variants = study_specs(name, spec, methods_given)
    study_dir = Path(study_dir) if study_dir else new_run_dir(spec.out_dir, f"study-{name}-{spec.data.task}")
    study_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    atomic_write(study_dir / "config.toml", dump_toml(to_dict(next(iter(variants.values())))))
    atomic_write(study_dir / "study.json", json.dumps({"study": name, "shows": STUDIES[name][0],
                                                       "variants": STUDIES[name][2]}, indent=2))
    runs = {}
    for variant, vspec in variants.items():
        target = study_dir / variant
        if (target / "metrics.json").is_file():  # a finished variant of an interrupted study is kept
            runs[variant] = target
            continue
        if target.exists():
            shutil.rmtree(target)
        runs[variant] = run_experiment(vspec, target, progress=progress)
    write_study_outputs(name, study_dir, runs, time.time() - t0)
    return study_dir


def write_study_outputs(name: str, study_dir: Path, runs: dict[str, Path], seconds: float) -> None:
    metrics = {v: json.loads((d / "metrics.json").read_text()) for v, d in runs.items()}
    first = next(iter(metrics.values()))
    metric = primary_metric(first)
    methods = list(first["methods"])
    summary = {"study": name, "shows": STUDIES[name][0], "task": first["task"], "metric": metric,
               "methods": methods, "variants": {v: m["aggregate"] for v, m in metrics.items()},
               "ci": {v: m.get("stats", {}).get("ci", {}) for v, m in metrics.items()},
               "by_level": {v: m.get("by_level", {}) for v, m in metrics.items()}, "seconds": seconds}
    atomic_write(study_dir / "metrics.json", json.dumps(summary, indent=2))
    atomic_write(study_dir / "run.json", json.dumps({"kind": "study", "study": name, "seconds": seconds,
                                                      "framework_version": FRAMEWORK_VERSION,
                                                      "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    scores = {v: {m: metrics[v]["aggregate"][m][metric] for m in methods} for v in metrics}
    plots.study_plot(scores, metric, study_dir / "plots" / "study.png",
                     f"Study '{name}' ({first['task']}): {metric} by variant")
    if name == "activity":
        levels = next(iter(metrics.values())).get("by_level", {})
        if levels:
            plots.levels_plot({lv: v["gain"] for lv, v in levels.items()}, metric, study_dir / "plots" / "levels.png",
                              f"Study 'activity' ({first['task']}): gain by activity level")
    atomic_write(study_dir / "metrics.md", study_markdown(summary, runs))
    atomic_write(study_dir / "REPORT.md", render([study_dir], out=study_dir / "REPORT.md"))


def study_markdown(summary: dict[str, Any], runs: dict[str, Path]) -> str:
    metric, methods = summary["metric"], summary["methods"]
    cis = summary.get("ci", {})

    def cell(v: str, m: str) -> str:
        ci = cis.get(v, {}).get(m, {}).get(metric)
        return f"{ci['mean']:.4f} [{ci['lo']:.4f}, {ci['hi']:.4f}]" if ci else f"{summary['variants'][v][m][metric]:.4f}"

    rows = [[v, f"[{v}/]({v}/REPORT.md)"] + [cell(v, m) for m in methods] for v in summary["variants"]]
    lines = [f"## Study: {summary['study']} ({summary['task']})", "", summary["shows"], "",
             markdown_table(["variant", "run"] + methods, rows), "",
             f"Scores: {metric}, all queries pooled" + (" [95% bootstrap CI over users]; each variant's own report "
                                                        "has the paired differences and the non-LLM baselines."
                                                        if any(cis.values()) else ".")]
    for v, levels in summary["by_level"].items():
        if summary["study"] == "activity" and levels:
            lrows = [[lv, str(x["users"])] + [f"{x['gain'][m]:+.4f}" for m in methods] for lv, x in levels.items()]
            lines += ["", f"Gain over non-personalized by activity level ({metric}, positive = better):", "",
                      markdown_table(["activity", "users"] + methods, lrows)]
    return "\n".join(lines) + "\n"
