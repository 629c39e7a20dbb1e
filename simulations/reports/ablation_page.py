"""The privacy ablation's table, plot and page (simulations/ablation.py computes the cells)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from shared.adapters import FRAMEWORK_VERSION
from shared.fileio import atomic_write
from shared.metrics import METRIC_DIRECTION
from shared.tables import markdown_table

from . import plots
from .page import render as render_page


AXIS_LABELS = {"noise_multiplier": "z", "clipping_norm": "C", "clients_per_round": "m", "population": "N",
               "federate_base_adapter": "federated", "record_dp": "DP-SGD"}


def series(cell: Mapping[str, Any], reference: Mapping[str, Any]) -> str:
    """Which line of the plot a cell belongs to: the noise sweep, or what else it changes."""
    return _series(cell, reference) + (" [small model]" if cell.get("small_model") else "")


def _series(cell: Mapping[str, Any], reference: Mapping[str, Any]) -> str:
    differ = [a for a in AXIS_LABELS if a != "noise_multiplier" and cell[a] != reference[a]]
    if not differ:
        return (f"noise sweep (C={reference['clipping_norm']:g}, m={reference['clients_per_round']}, "
                f"N={reference['population']})")
    if not cell["federate_base_adapter"]:
        return "base adapter not federated"
    parts = []
    for a in differ:
        v = cell[a]
        parts.append(f"{AXIS_LABELS[a]}={'on' if v is True else 'off' if v is False else f'{v:g}'}")
    return ", ".join(parts) + (f", z={cell['noise_multiplier']:g}" if cell["noise_multiplier"] != reference["noise_multiplier"] else "")


def _eps(v: float | None) -> str:
    return "∞" if v is None else f"{v:.3g}"


def table(metrics: Mapping[str, Any]) -> str:
    metric = metrics["utility_metric"]
    arrow = "↑" if METRIC_DIRECTION.get(metric, "higher") == "higher" else "↓"
    rows = []
    for c in metrics["cells"]:
        rows.append([str(c["id"]), "small" if c["small_model"] else "base", f"{c['noise_multiplier']:g}",
                     f"{c['clipping_norm']:g}", str(c["clients_per_round"]), str(c["population"]),
                     f"{c['clients_per_round'] / c['population']:.2f}", "yes" if c["federate_base_adapter"] else "no",
                     "yes" if c["record_dp"] else "no", _eps(c["epsilon"]),
                     "-" if c["record_epsilon"] is None else f"{c['record_epsilon']:.3g}",
                     f"{c['utility']:.4f}", f"{c['auc_base']:.3f}",
                     "-" if c.get("auc_before") is None else f"{c['auc_before']:.3f}",
                     "-" if c.get("auc_calibrated") is None else f"{c['auc_calibrated']:.3f}",
                     f"{c['attack']['member_loss']:.3f} / {c['attack']['nonmember_loss']:.3f}",
                     "-" if c.get("update_norm") is None else f"{c['update_norm']:.3g}", f"{c['seconds']:.0f}"])
    return markdown_table(["cell", "model", "z", "C", "m", "N", "q", "federated", "DP-SGD", "ε (user)", "ε (record)",
                           f"{metric} {arrow}", "attack AUC (base)", "AUC before rounds", "calibrated AUC", "loss member / non-member",
                           "update norm (before clip)", "s"], rows)


def render(metrics: Mapping[str, Any], seconds: float) -> str:
    ref = metrics.get("reference") or {}
    cells = metrics["cells"]
    delta = cells[0]["delta"] if cells else None
    lines = [f"## Privacy ablation ({metrics['task']})", "",
             f"Data: {metrics.get('source', '')}", ""]
    lines += [table(metrics), ""]
    lines += [f"ε: user-level epsilon of the shared base adapter at δ = {delta:g}: DP-FedAvg as the coordinator runs "
              "it (shared/aggregation.py: Poisson participation with q = m/N, m the expected participants per round, "
              "server-side clipping to C, fixed denominator q·N, noise z·C/(q·N)), one Poisson-subsampled Gaussian "
              "step per round, the smaller of the RDP and PRV bounds; ∞ = updates shared without noise; "
              "0 = nothing shared. ε (record): largest per-user epsilon of record-level DP-SGD on the local training.",
              f"Participation and noise seeded (seed {metrics.get('sampling_seed', '-')}): "
              f"{metrics.get('sampling_note', '')}.",
              "Attack: loss-threshold membership inference against the shared base adapter; members = history "
              "records of the users sampled at least once, non-members = records of hold-out users who never take "
              "part (both drawn by a seeded shuffle of the same selection); AUC 0.5 = chance. "
              "AUC before rounds: the same attack on the same records against the base adapter before "
              "federation, i.e. what the records' own differences give away; the leak is the difference. "
              "Calibrated AUC: the attack scores each record by how much its loss fell from that initial adapter "
              "(which every client received) to the final one (Watson et al., ICLR 2022); 0.5 exactly when "
              "nothing moved.", ""]
    if ref:
        lines += [f"Reference: the same attack against {ref['users']} unprotected personal adapter(s) (their owners' "
                  f"records vs hold-out records): mean AUC {ref['auc']:.3f}.", ""]
    if metrics.get("small_model"):
        lines += [f"Note: {metrics['small_model']}", ""]
    if metrics.get("complete"):
        lines += [f"**Partial: {metrics['complete']} done so far** (the table is rewritten after every cell).", ""]
    lines += [f"Wall time: {seconds:.0f} s.", ""]
    return "\n".join(lines)


def write_ablation_outputs(run_dir: Path, metrics: dict[str, Any], seconds: float) -> None:
    cells: Sequence[dict[str, Any]] = metrics["cells"]
    for c in cells:
        c["series"] = series(c, cells[0])
    metrics["seconds"] = seconds
    atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write(run_dir / "run.json", json.dumps({"kind": "ablation", "framework_version": FRAMEWORK_VERSION,
                                                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                    "seconds": seconds}, indent=2))
    ref = metrics.get("reference") or {}
    plots.tradeoff_plot(cells, metrics["utility_metric"], run_dir / "plots" / "tradeoff.png",
                        f"Privacy ablation ({metrics['task']}): utility and membership inference vs ε",
                        reference_auc=ref.get("auc"))
    atomic_write(run_dir / "metrics.md", render(metrics, seconds))
    atomic_write(run_dir / "REPORT.md", render_page([run_dir], out=run_dir / "REPORT.md"))
