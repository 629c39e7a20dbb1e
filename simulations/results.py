"""What a finished run writes besides predictions: metrics by user, by activity level and by
round, the privacy spent, the plots, and the one-page REPORT.md (simulations/report.py).

run_dir/ (in addition to what simulations/experiment.py and coordinator/federation.py write)
  run.json        what kind of run this is (experiment | simulate), how long it took
  data.json       users: history size and activity level; source and notes
  metrics.json    aggregate, per user, per activity level, per round, privacy
  metrics.md      the same as Markdown tables
  privacy.json    user-level (epsilon, delta) of the federation, record-level DP-SGD per user
  plots/*.png     methods.png, rounds.png (federated runs), levels.png (more than one level)
  REPORT.md       the one-page report (`oppu report RUN_DIR` renders it again)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

from shared.adapters import FRAMEWORK_VERSION
from shared.fileio import atomic_write
from shared.metrics import METRIC_DIRECTION

from .reporting import markdown_table, signed_percent


def primary_metric(metrics: Mapping[str, Any]) -> str:
    return next(iter(next(iter(metrics["aggregate"].values())).keys()))


def gain(value: float, baseline: float, metric: str) -> float:
    """Improvement in metric units, positive = better whatever the metric's direction."""
    sign = 1.0 if METRIC_DIRECTION.get(metric, "higher") == "higher" else -1.0
    return sign * (value - baseline)


def level_gains(metrics: Mapping[str, Any], levels: Mapping[str, str], metric: str) -> dict[str, Any]:
    """Mean per-user gain over non-personalized of each method, per activity level."""
    per_user = metrics.get("per_user", {})
    out: dict[str, Any] = {}
    if "non-personalized" not in metrics["methods"]:
        return out
    for lv in ("low", "medium", "high"):
        users = [u for u, level in levels.items() if level == lv and u in per_user]
        if not users:
            continue
        out[lv] = {"users": len(users), "gain": {}, "score": {}}
        for m in metrics["methods"]:
            scores = [per_user[u][m][metric] for u in users]
            gains = [gain(per_user[u][m][metric], per_user[u]["non-personalized"][metric], metric) for u in users]
            out[lv]["score"][m] = sum(scores) / len(scores)
            out[lv]["gain"][m] = sum(gains) / len(gains)
    return out


def write_outputs(run_dir: Path, kind: str, metrics: dict[str, Any], data_info: dict[str, Any],
                  summary: Mapping[str, Any] | None = None, privacy: Mapping[str, Any] | None = None,
                  seconds: float | None = None, *, resumed: bool = False) -> None:
    """Complete `metrics` (levels, rounds, privacy) and write metrics.json/.md, plots, REPORT.md.
    `resumed`: this invocation continued an interrupted run, so `seconds` covers only its part."""
    from . import plots
    from .report import render

    metric = primary_metric(metrics)
    levels = {u: info.get("level") for u, info in data_info.get("users", {}).items() if info.get("level")}
    metrics["by_level"] = level_gains(metrics, levels, metric)
    if summary is not None:
        metrics["rounds"] = [_round_row(r) for r in summary.get("rounds", [])]
        metrics["initial"] = summary.get("initial", {})
    if privacy is not None:
        metrics["privacy"] = dict(privacy)
        atomic_write(run_dir / "privacy.json", json.dumps(privacy, indent=2))
    if seconds is not None:
        metrics["seconds"] = seconds
    atomic_write(run_dir / "data.json", json.dumps(data_info, indent=2))
    atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write(run_dir / "run.json", json.dumps({"kind": kind, "framework_version": FRAMEWORK_VERSION,
                                                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                    "seconds": seconds, "resumed": resumed}, indent=2))
    title = f"{metrics['task']}, {data_info.get('eval_users', len(metrics.get('per_user', {})))} users"
    plots.methods_plot(metrics, metric, run_dir / "plots" / "methods.png", f"{title}: {metric} by method")
    if summary is not None and summary.get("rounds"):
        plots.rounds_plot(summary["rounds"], summary.get("initial", {}), metric, run_dir / "plots" / "rounds.png",
                          f"{title}: federated rounds")
    if len(metrics["by_level"]) > 1:
        plots.levels_plot({lv: v["gain"] for lv, v in metrics["by_level"].items() if lv},
                          metric, run_dir / "plots" / "levels.png", f"{title}: gain by activity level")
    atomic_write(run_dir / "metrics.md", metrics_markdown(metrics, data_info))
    atomic_write(run_dir / "REPORT.md", render([run_dir], out=run_dir / "REPORT.md"))


def _round_row(r: Mapping[str, Any]) -> dict[str, Any]:
    return {"round": r["round"], "sampled": r["sampled"], "users": r.get("users", []), "aggregated": r["aggregated"],
            "rejected": len(r.get("rejected", {})), "base_loss": r.get("train", {}).get("base-loss"),
            "evaluate": r.get("evaluate", {}), "epsilon": r.get("epsilon"), "seconds": r.get("seconds")}


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def metrics_markdown(metrics: Mapping[str, Any], data_info: Mapping[str, Any]) -> str:
    """Aggregate, per-user, per-level, per-round and privacy tables of one run."""
    names = list(next(iter(metrics["aggregate"].values())).keys())
    methods = list(metrics["methods"])
    arrows = {n: "↑" if METRIC_DIRECTION.get(n, "higher") == "higher" else "↓" for n in names}
    imp = metrics.get("improvement_over_non_personalized") or {}
    rows = [[m] + [_fmt(metrics["aggregate"][m][n]) for n in names]
            + ([signed_percent(imp[m][n]) if imp.get(m, {}).get(n) is not None else "n/a" for n in names] if imp else [])
            for m in methods]
    header = ["method"] + [f"{n} {arrows[n]}" for n in names] + ([f"Δ{n} vs non-pers." for n in names] if imp else [])
    out = [f"## Scores ({metrics['task']}, all queries pooled)", "", markdown_table(header, rows), "",
           "Δ: relative change against non-personalized, positive = better.", ""]
    metric = names[0]
    users = data_info.get("users", {})
    per_user = metrics.get("per_user", {})
    if per_user:
        urows = [[u, str(users.get(u, {}).get("history", "-")), users.get(u, {}).get("level", "-")]
                 + [_fmt(per_user[u][m][metric]) for m in methods] for u in per_user]
        out += [f"## Per user ({metric} {arrows[metric]})", "",
                markdown_table(["user", "history", "activity"] + methods, urows), ""]
    by_level = metrics.get("by_level") or {}
    if by_level:
        lrows = [[lv, str(v["users"])] + [f"{v['gain'][m]:+.4f}" for m in methods] for lv, v in by_level.items()]
        out += [f"## Gain over non-personalized by activity level ({metric}, mean over users, positive = better)", "",
                markdown_table(["activity", "users"] + methods, lrows), ""]
    rounds = metrics.get("rounds") or []
    if rounds:
        key = f"non-personalized/{metric}"
        rrows = [[str(r["round"]), f"{r['aggregated']}/{r['sampled']}", " ".join(r.get("users", [])) or "-",
                  str(r["rejected"]), _fmt(r["base_loss"], ".3f"),
                  _fmt(r["evaluate"].get(key)), _fmt(r["epsilon"], ".3f"), _fmt(r["seconds"], ".0f")] for r in rounds]
        out += ["## Federated rounds", "",
                markdown_table(["round", "aggregated/sampled", "sampled users", "rejected", "base loss",
                                f"non-pers. {metric}", "epsilon", "s"], rrows),
                "", "Sampled users: user-k is entry k (from 0) of users/index.json; node-ID is a deployed client.", ""]
    p = metrics.get("privacy")
    if p:
        out += ["## Privacy spent", "", privacy_line(p), ""]
    return "\n".join(out)


def privacy_line(p: Mapping[str, Any]) -> str:
    u = p.get("user_level", {})
    parts = []
    if not u.get("federate_base_adapter"):
        parts.append("User level: the base adapter is not federated (nothing leaves a user's machine).")
    elif u.get("noise_multiplier"):
        parts.append(f"User level (DP-FedAvg on the base adapter, RDP accountant): epsilon = {_fmt(u.get('epsilon'), '.3f')} "
                     f"at delta = {u.get('delta')} after {u.get('rounds_accounted')} rounds "
                     f"(noise multiplier {u['noise_multiplier']}, clipping norm {u['clipping_norm']}).")
    else:
        parts.append("User level: base-adapter updates are shared without noise: epsilon is infinite.")
    r = p.get("record_level", {})
    if r.get("level", "none") != "none":
        eps = r.get("epsilon_per_user", {})
        worst = max(eps.values()) if eps else None
        parts.append(f"Record level (DP-SGD on {r['level']}): largest per-user epsilon {_fmt(worst, '.3f')} "
                     f"at delta = {p.get('user_level', {}).get('delta')}.")
    else:
        parts.append("Record level: no DP-SGD (personal adapters are trained without noise and never leave the user's machine).")
    return " ".join(parts)
