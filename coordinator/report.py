"""The coordinator's reports: one log line per round, report.md (per-round table and the
final per-method scores the clients reported), and how the run's epsilon was obtained."""

from __future__ import annotations

from typing import Any

from shared.config import FederatedSpec
from shared.tables import markdown_table


def round_line(entry: dict[str, Any], total: int) -> str:
    parts = [f"round {entry['round']}/{total}: {entry['replied']}/{entry['sampled']} users replied",
             f"{len(entry['rejected'])} rejected"]
    if "base-loss" in entry["train"]:
        parts.append(f"base loss {entry['train']['base-loss']:.3f}")
    for k, v in entry.get("evaluate", {}).items():
        if k.startswith("non-personalized/"):
            parts.append(f"{k} {v:.4f}")
    if entry["epsilon"] is not None:
        parts.append(f"epsilon {entry['epsilon']:.3f} (delta {entry['delta']:g})")
    b = entry["bytes_per_client"]
    parts.append(f"{(b['artifacts'] + b['base_adapter_down'] + b['base_adapter_up']) / 1e6:.2f} MB per client")
    parts.append(f"{entry['seconds']:.0f} s")
    return ", ".join(parts)


def render_report(summary: dict[str, Any], spec: FederatedSpec) -> str:
    f = spec.federation
    lines = [f"# Federated OPPU: {summary['task']}, {len(summary['rounds'])} rounds ({summary['status']})", "",
             f"Strategy {f.strategy}{' + FFA-LoRA' if f.ffa_lora else ''}; base adapter federated: "
             f"{spec.experiment.privacy.federate_base_adapter}; DP: "
             + (f"z={spec.experiment.privacy.noise_multiplier}, C={spec.experiment.privacy.clipping_norm}"
                if spec.dp else "off"), ""]
    how = summary.get("privacy") or {}
    if spec.dp and how:
        lines += [f"Epsilon: {how.get('accountant', '')}; participation: {how.get('sampling', '')}."
                  + (f" Note: {how['note']}." if how.get("note") else "")
                  + (f" SecAgg+: {how['secagg']}." if how.get("secagg") else ""), ""]
    a = summary.get("artifacts", {})
    if a:
        streamed = a.get("streamed_bytes_per_client", {})
        lines += [f"Artifacts: base model {a['model'][:12]} ({a['model_bytes'] / 1e6:.1f} MB), initial base adapter "
                  f"{a['base_adapter'][:12]} ({a.get('base_adapter_bytes', 0) / 1e3:.0f} kB); streamed to "
                  f"{sum(1 for b in streamed.values() if b)} of {len(streamed)} clients "
                  f"(max {max(streamed.values(), default=0) / 1e6:.1f} MB; the others held them already).", ""]
    rows = []
    if summary.get("initial"):
        ev = {k.split("/", 1)[1]: v for k, v in summary["initial"].items() if k.startswith("non-personalized/")}
        rows.append(["0 (start)", "-", "-", "-", ", ".join(f"{k} {v:.4f}" for k, v in ev.items()) or "-",
                     "-", "-", "-", "-"])
    for r in summary["rounds"]:
        ev = {k.split("/", 1)[1]: v for k, v in r.get("evaluate", {}).items() if k.startswith("non-personalized/")}
        b = r["bytes_per_client"]
        rows.append([str(r["round"]), f"{r['replied']}/{r['sampled']}", str(len(r["rejected"])),
                     f"{r['train'].get('base-loss', float('nan')):.3f}",
                     ", ".join(f"{k} {v:.4f}" for k, v in ev.items()) or "-",
                     "-" if r["epsilon"] is None else f"{r['epsilon']:.3f}",
                     f"{b['base_adapter_down'] / 1e3:.0f} / {b['base_adapter_up'] / 1e3:.0f}",
                     f"{b['artifacts'] / 1e6:.1f}", f"{r['seconds']:.0f}"])
    lines += [markdown_table(["round", "replied", "rejected", "base loss", "base adapter (non-personalized)",
                              "epsilon", "adapter kB down/up per client", "artifact MB per client", "s"], rows), ""]
    final = summary["final"]
    methods = [m for m in spec.experiment.methods if any(k.startswith(f"{m}/") for k in final)]
    if methods:
        names = sorted({k.split("/", 1)[1] for k in final if "/" in k})
        lines += [f"Final evaluation on {int(final.get('users', 0))} users (mean of per-user scores, "
                  "weighted by queries; clients report numbers only):", "",
                  markdown_table(["method"] + names,
                                 [[m] + [f"{final.get(f'{m}/{n}', float('nan')):.4f}" for n in names] for m in methods]),
                  ""]
    return "\n".join(lines)


SEEDED_NOTE = "sampling seeded for reproducibility: the epsilon assumes the seed is secret"


def privacy_summary(spec: FederatedSpec, accounting: Any) -> dict[str, Any]:
    """How the run's user-level epsilon was obtained (federation.json, privacy.json, REPORT.md)."""
    f = spec.federation
    if not spec.dp:
        return {"mechanism": "none" if not spec.experiment.privacy.federate_base_adapter else "no noise (epsilon infinite)",
                "sampling": f"fixed-size, seeded by federation.seed={f.seed}"}
    out: dict[str, Any] = {
        "mechanism": "DP-FedAvg (shared/aggregation.py): Poisson participation, server-side clipping to C, "
                     "fixed denominator q*N, Gaussian noise z*C/(q*N)",
        "accountant": "Poisson-subsampled Gaussian; epsilon = the smaller of the RDP (Opacus) and PRV "
                      "(Opacus, Gopi et al. 2021) upper bounds",
        "sample_rate": f.fraction_train,
        "sampling": (f"Poisson, seeded by federation.sampling_seed={f.sampling_seed}" if f.sampling_seed >= 0
                     else "Poisson, from the OS's CSPRNG"),
        "sampling_seeded": f.sampling_seed >= 0,
        **(accounting.report() or {}),
    }
    if f.sampling_seed >= 0:
        out["note"] = SEEDED_NOTE
    if f.secagg:
        out["secagg"] = ("under SecAgg+ the coordinator cannot clip individual updates: the bound C relies on each "
                         "client clipping its own")
    return out
