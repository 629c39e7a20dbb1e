"""PNG figures for run directories (matplotlib, Agg backend: no display needed).

Every figure has a title, axis labels with units or directions, and a legend where there is more
than one series, so it can be read on its own in a Markdown report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from shared.metrics import METRIC_DIRECTION


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _arrow(metric: str) -> str:
    return "higher is better" if METRIC_DIRECTION.get(metric, "higher") == "higher" else "lower is better"


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    tmp.replace(path)  # atomic: a report never links a half-written image
    return path


def methods_plot(metrics: Mapping[str, Any], metric: str, path: Path, title: str) -> Path:
    """Bars: the pooled score of each method and non-LLM baseline (hatched), with its 95% bootstrap
    CI over users as error bars when the run has statistics; dots: each user's own score."""
    plt = _plt()
    baselines = metrics.get("baselines") or {}
    methods = list(metrics["methods"]) + list(baselines.get("methods", []))
    is_base = [i >= len(metrics["methods"]) for i in range(len(methods))]
    agg = {**metrics["aggregate"], **baselines.get("aggregate", {})}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(methods) + 2), 4.6))
    heights = [agg[m][metric] for m in methods]
    ci = (metrics.get("stats") or {}).get("ci", {})
    yerr = None
    if all(m in ci for m in methods):
        lo = [max(0.0, h - ci[m][metric]["lo"]) for m, h in zip(methods, heights)]
        hi = [max(0.0, ci[m][metric]["hi"] - h) for m, h in zip(methods, heights)]
        yerr = [lo, hi]
    colors = ["#cfcfcf" if b else "#7aa6d6" for b in is_base]
    bars = ax.bar(range(len(methods)), heights, color=colors, yerr=yerr, capsize=4, ecolor="#333333",
                  label="all queries pooled" + (" (error bar: 95% CI over users)" if yerr else ""))
    for bar, b in zip(bars, is_base):
        if b:
            bar.set_hatch("//")
    per_user = {u: {**s, **baselines.get("per_user", {}).get(u, {})} for u, s in metrics.get("per_user", {}).items()}
    for i, m in enumerate(methods):
        ys = [u[m][metric] for u in per_user.values() if m in u]
        xs = [i + (j - (len(ys) - 1) / 2) * 0.06 for j in range(len(ys))]
        ax.scatter(xs, ys, color="#1f3b5c", s=14, zorder=3, label="one user" if i == 0 else None)
    ax.set_xticks(range(len(methods)), [m.removeprefix("baseline: ") for m in methods], rotation=20, ha="right")
    ax.set_ylabel(f"{metric} ({_arrow(metric)})")
    ax.set_xlabel("method (grey, hatched: non-LLM baseline)" if any(is_base) else "method")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if any(is_base):
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="#cfcfcf", hatch="//", label="non-LLM baseline"))
        labels.append("non-LLM baseline")
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def rounds_plot(rounds: Sequence[Mapping[str, Any]], initial: Mapping[str, float], metric: str, path: Path,
                title: str) -> Path:
    """Per federated round: the clients' mean base-adapter training loss, the global base adapter's
    (non-personalized) score, and the user-level epsilon spent so far."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    xs = [r["round"] for r in rounds]
    loss = [r.get("train", {}).get("base-loss", math.nan) for r in rounds]
    axes[0].plot(xs, loss, marker="o", label="mean of sampled clients")
    axes[0].set_title("base-adapter training loss")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("answer cross-entropy (nats/token)")
    key = f"non-personalized/{metric}"
    ex = ([0] if key in initial else []) + [r["round"] for r in rounds if key in r.get("evaluate", {})]
    ey = ([initial[key]] if key in initial else []) + [r["evaluate"][key] for r in rounds if key in r.get("evaluate", {})]
    axes[1].plot(ex, ey, marker="o", color="#2a7", label="global base adapter")
    axes[1].set_title(f"non-personalized {metric} during training")
    axes[1].set_xlabel("round (0 = before round 1)")
    axes[1].set_ylabel(f"{metric} ({_arrow(metric)})")
    eps = [r["epsilon"] if r.get("epsilon") is not None else math.nan for r in rounds]
    axes[2].plot(xs, eps, marker="o", color="#c33", label="user-level epsilon (RDP)")
    axes[2].set_title("privacy spent (user level)")
    axes[2].set_xlabel("round")
    axes[2].set_ylabel("epsilon at the run's delta")
    if all(math.isnan(e) for e in eps):
        axes[2].text(0.5, 0.5, "no DP noise:\nepsilon is infinite", ha="center", va="center",
                     transform=axes[2].transAxes)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    return _save(fig, path)


def levels_plot(levels: Mapping[str, Mapping[str, float]], metric: str, path: Path, title: str) -> Path:
    """Grouped bars: each method's gain over non-personalized, per activity level."""
    plt = _plt()
    order = [lv for lv in ("low", "medium", "high") if lv in levels]
    # In the run's method order; non-personalized is the reference (its gain is 0 by definition).
    methods = [m for m in dict.fromkeys(m for lv in order for m in levels[lv]) if m != "non-personalized"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    _grouped_bars(ax, order, methods, lambda lv, m: levels[lv].get(m, math.nan),
                  labels=[f"{lv} activity" for lv in order])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("users bucketed by history size (tertiles)")
    ax.set_ylabel(f"gain in {metric} over non-personalized\n(positive = better)")
    ax.set_title(title)
    return _save(fig, path)


def _grouped_bars(ax: Any, groups: Sequence[str], series: Sequence[str], value: Any,
                  labels: Sequence[str] | None = None) -> None:
    """One group of bars per x position, one bar per series in each; value(group, series). Each
    bar carries its value, so a zero (no gain) reads as 0 rather than as a missing bar."""
    width = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, [value(g, name) for g in groups], width, label=name)
        ax.bar_label(bars, fmt=lambda v: "" if math.isnan(v) else f"{v:.3g}", fontsize=7, padding=2)
    ax.use_sticky_edges = False  # bars stick to 0 otherwise, leaving no room above/below for labels
    ax.margins(y=0.12)
    ax.set_xticks(range(len(groups)), list(labels or groups))
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)


def tradeoff_plot(cells: Sequence[Mapping[str, Any]], metric: str, path: Path, title: str,
                  reference_auc: float | None = None) -> Path:
    """Left: utility against epsilon (infinite epsilon drawn at the right edge). Right: the
    membership-inference attack AUC of each cell against its epsilon, with 0.5 (chance) marked."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 6.2))
    finite = [c["epsilon"] for c in cells if c.get("epsilon") is not None and 0 < c["epsilon"] < math.inf]
    right = max(finite) * 4 if finite else 10.0
    left = min(finite) / 4 if finite else 0.1

    def x(c: Mapping[str, Any]) -> float:
        e = c.get("epsilon")
        if e is None or not math.isfinite(e):
            return right  # no noise: epsilon is infinite
        return left if e <= 0 else e  # nothing shared: epsilon 0

    groups: dict[str, list[Mapping[str, Any]]] = {}
    for c in cells:
        groups.setdefault(c.get("series", "cells"), []).append(c)
    markers = "osD^v<>phX*"
    for j, (name, cs) in enumerate(groups.items()):
        cs = sorted(cs, key=x)
        style = dict(marker=markers[j % len(markers)], ls="-" if len(cs) > 1 else "none", ms=7)
        ax.plot([x(c) for c in cs], [c["utility"] for c in cs], label=name, **style)
        line = ax2.plot([x(c) for c in cs], [c["auc_base"] for c in cs], label=f"{name}: loss threshold", **style)
        if all(c.get("auc_calibrated") is not None for c in cs):
            ax2.plot([x(c) for c in cs], [c["auc_calibrated"] for c in cs], label=f"{name}: calibrated",
                     color=line[0].get_color(), mfc="none", **{**style, "ls": "--" if len(cs) > 1 else "none"})
    if reference_auc is not None:
        ax2.axhline(reference_auc, color="#c33", ls="--", label="unprotected personal adapter")
    ax2.axhline(0.5, color="gray", ls=":", label="chance (AUC 0.5)")
    has_inf = any(c.get("epsilon") is None or not math.isfinite(c["epsilon"]) for c in cells)
    has_zero = any(c.get("epsilon") is not None and c["epsilon"] <= 0 for c in cells)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xlabel("user-level ε at the run's δ (log scale)")
        a.grid(alpha=0.3, which="both")
        for edge, shown, text in ((right, has_inf, "no noise\nε = ∞"), (left, has_zero, "nothing\nshared, ε = 0")):
            if shown:
                a.axvline(edge, color="gray", lw=0.6, ls="--")
                a.annotate(text, (edge, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                           fontsize=7, color="gray")
        # Below the axes: inside, the legend would cover the points it explains.
        a.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    ax.set_ylabel(f"{metric} ({_arrow(metric)})")
    ax.set_title("utility vs privacy", pad=22)
    ax2.set_ylabel("attack AUC on the shared base adapter (0.5 = chance)")
    ax2.set_title("membership inference vs privacy", pad=22)
    fig.suptitle(title)
    return _save(fig, path)


def study_plot(scores: Mapping[str, Mapping[str, float]], metric: str, path: Path, title: str) -> Path:
    """Grouped bars: each variant of a study (x) and each method's score (bars)."""
    plt = _plt()
    variants = list(scores)
    methods = list(next(iter(scores.values())))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.8 * len(variants) + 2), 4.2))
    _grouped_bars(ax, variants, methods, lambda v, m: scores[v][m])
    ax.set_xlabel("variant")
    ax.set_ylabel(f"{metric} ({_arrow(metric)})")
    ax.set_title(title)
    return _save(fig, path)
