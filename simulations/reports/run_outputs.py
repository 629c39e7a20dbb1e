"""What a finished run writes besides predictions: metrics by user, by activity level and by
round, the privacy spent, the plots, and the one-page REPORT.md (simulations/reports/page.py).

run_dir/ (in addition to what simulations/experiment.py and coordinator/run.py write)
  run.json        what kind of run this is (experiment | simulate), how long it took
  data.json       users: history size and activity level; source and notes
  metrics.json    aggregate, per user, per activity level, per round, privacy; "baselines" (non-LLM
                  personal baselines' scores) and "stats" (CIs over users, paired differences)
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
from shared.metrics import METRIC_DIRECTION, gain
from shared.tables import markdown_table

from . import plots


__all__ = ["gain", "level_gains", "metrics_markdown", "primary_metric", "scores_section", "write_outputs"]


def primary_metric(metrics: Mapping[str, Any]) -> str:
    return next(iter(next(iter(metrics["aggregate"].values())).keys()))


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
    from .page import render  # here, not at the top: reports/page.py imports this module

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


def _arrow(metric: str) -> str:
    return "↑" if METRIC_DIRECTION.get(metric, "higher") == "higher" else "↓"


def _ci(c: Mapping[str, float]) -> str:
    return f"{c['mean']:.4f} [{c['lo']:.4f}, {c['hi']:.4f}]"


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def signed4(x: float) -> str:
    """"+0.1234"; a value that rounds to zero reads "+0.0000", never "-0.0000"."""
    text = f"{x:+.4f}"
    return "+0.0000" if text == "-0.0000" else text


def _diff(d: Mapping[str, float], alpha: float) -> str:
    """"+0.1000* [+0.0200, +0.1800] p=0.012": * marks a win: the interval is all above zero and the
    permutation test agrees (p < alpha). With a handful of users every resample can favour the
    method while the permutation test cannot reach p < alpha (3 users: p >= 2/8); no star then."""
    win = d["lo"] > 0 and d["p"] < alpha
    return f"{signed4(d['gain'])}{'*' if win else ''} [{signed4(d['lo'])}, {signed4(d['hi'])}] {_p(d['p'])}"


_REF_LABEL = {"non-personalized": "non-pers.", "RAG": "RAG"}


def all_methods(metrics: Mapping[str, Any]) -> list[str]:
    """The run's methods, then its non-LLM baselines (rows of the same tables)."""
    return list(metrics["methods"]) + list((metrics.get("baselines") or {}).get("methods", []))


def all_aggregate(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return {**metrics["aggregate"], **((metrics.get("baselines") or {}).get("aggregate", {}))}


def stats_caption(stats: Mapping[str, Any]) -> str:
    perm = (f"exact over all {stats['n_perm']} swap patterns" if stats["permutation"] == "exact"
            else f"{stats['n_perm']} random swap patterns")
    return (f"[95% CI]: percentile bootstrap over the {stats['users']} users ({stats['n_boot']} resamples; each "
            "draws users with replacement and rescores all their queries pooled, as the point estimate). "
            "Δ: paired gain on the same users and queries, in the metric's units, positive = better whatever "
            "its direction; its CI uses the same resampled users for both methods; p: two-sided paired "
            f"permutation test (per user, the two methods' answers swapped; {perm}). "
            f"* marks a win: its CI excludes zero and p < {stats['alpha']:g}. "
            "Rows named 'baseline: ...' are non-LLM personal baselines answered from each user's own "
            "history (shared/baselines.py)"
            + (f"; the best of them on {stats['metric']} is '{stats['best_baseline']}'." if stats.get("best_baseline")
               else "."))


def scores_section(metrics: Mapping[str, Any]) -> list[str]:
    """The run's score table: per method and baseline, each metric with its 95% CI over users, the
    paired gain in the primary metric over non-personalized and RAG (CI, permutation p), users,
    queries, adoption when recorded, and a flag on methods that do not beat the best baseline.
    A metrics.json written before statistics existed gets the plain pooled table."""
    stats = metrics.get("stats")
    agg = all_aggregate(metrics)
    names = list(next(iter(agg.values())).keys())
    methods = all_methods(metrics)
    adoption = metrics.get("adoption") or {}
    if not stats:
        rows = [[m] + [_fmt(agg[m][n]) for n in names] for m in methods]
        return [markdown_table(["method"] + [f"{n} {_arrow(n)}" for n in names], rows), "",
                "Scores: all queries pooled.", ""]
    metric = stats["metric"]
    refs = [r for r in stats["references"] if r in _REF_LABEL]
    header = (["method"] + [f"{n} {_arrow(n)} [95% CI]" for n in names]
              + [f"Δ{metric} vs {_REF_LABEL[r]} [95% CI]" for r in refs] + ["users", "queries"]
              + (["adopted"] if adoption else []) + ["note"])
    below = set(stats.get("below_best_baseline", []))
    rows = []
    for m in methods:
        row = [m] + [_ci(stats["ci"][m][n]) for n in names]
        row += ["(reference)" if m == r else _diff(stats["vs"][r][m][metric], stats["alpha"]) for r in refs]
        row += [str(stats["users"]), str(stats["queries"])]
        if adoption:
            a = adoption.get(m)
            row.append(f"{a['adopted']}/{a['users']}" if a else "-")
        row.append("below best non-LLM baseline" if m in below else "")
        rows.append(row)
    return [markdown_table(header, rows), "",
            "Scores: all queries pooled. " + stats_caption(stats)
            + (" adopted: users whose personal adapter was kept (selection.adopt \"better\": it beat the base on "
               "their validation items; \"last\": always, its validation still scored)."
               if adoption else ""), ""]


def differences_section(metrics: Mapping[str, Any]) -> list[str]:
    """Every metric's paired difference of every method against every reference."""
    stats = metrics.get("stats")
    if not stats or not stats.get("vs"):
        return []
    names = list(next(iter(all_aggregate(metrics).values())).keys())
    rows = [[m, ref] + [_diff(stats["vs"][ref][m][n], stats["alpha"]) for n in names]
            for ref in stats["references"] for m in all_methods(metrics) if m != ref]
    return ["## Paired differences (gain over the reference, positive = better)", "",
            markdown_table(["method", "reference"] + [f"Δ{n} [95% CI], p" for n in names], rows), ""]


def metrics_markdown(metrics: Mapping[str, Any], data_info: Mapping[str, Any]) -> str:
    """Aggregate (with CIs and baselines), paired-difference, per-user, per-level, per-round and
    privacy tables of one run."""
    methods = list(metrics["methods"])
    out = [f"## Scores ({metrics['task']}, all queries pooled)", ""] + scores_section(metrics)
    out += differences_section(metrics)
    metric = primary_metric(metrics)
    users = data_info.get("users", {})
    per_user = metrics.get("per_user", {})
    if per_user:
        base_per_user = (metrics.get("baselines") or {}).get("per_user", {})
        columns = all_methods(metrics)
        scores = {u: {**per_user[u], **base_per_user.get(u, {})} for u in per_user}
        urows = [[u, str(users.get(u, {}).get("history", "-")), users.get(u, {}).get("level", "-")]
                 + [_fmt(scores[u][m][metric]) if m in scores[u] else "-" for m in columns] for u in per_user]
        out += [f"## Per user ({metric} {_arrow(metric)})", "",
                markdown_table(["user", "history", "activity"] + columns, urows), ""]
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
        rdp = f"; RDP alone: {_fmt(u['epsilon_rdp'], '.3f')}" if u.get("epsilon_rdp") is not None else ""
        parts.append(f"User level (DP-FedAvg on the base adapter: Poisson participation, server-side clipping, fixed "
                     f"denominator; epsilon the smaller of the PRV and RDP bounds{rdp}): "
                     f"epsilon = {_fmt(u.get('epsilon'), '.3f')} "
                     f"at delta = {u.get('delta')} after {u.get('rounds_accounted')} rounds "
                     f"(noise multiplier {u['noise_multiplier']}, clipping norm {u['clipping_norm']}).")
        if u.get("note"):
            parts.append(f"Note: {u['note']}.")
        if u.get("client_metrics"):
            parts.append(f"Per-user numbers: {u['client_metrics']}.")
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
