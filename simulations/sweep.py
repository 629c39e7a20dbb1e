"""`oppu sweep`: choose the personal-training recipe on validation data only (mode "personal",
below); retrieval and decoding are chosen the same way by modes "inference" and "retrieval"
(simulations/inference_sweep.py).

Each variant (a set of `--set` overrides on one experiment config) trains every sweep user's
personal adapter through THE selection path (shared.selection.train_and_select_users), which holds
out the user's most recent history items. What is compared is measured on those held-out items
only; the users' queries (what `oppu experiment` and `make quality` report) are never read.

Per variant and user the sweep records: the validation score of base + base adapter under the
variant's prompt (for OPPU+RAG that is RAG itself), of the last checkpoint, and of what
selection keeps (the adopted checkpoint, else base), whether it adopted, and the cross-fitted
gain of selection (shared.selection.cross_fitted_gain: the rule picks on all validation items but
one and is scored on the one left out, in turn). The choice is the variant with the best mean
cross-fitted gain, ties broken by the last checkpoint's loss. The selected score is chosen on the
items it is measured on, so it is optimistic, and the more so the more a variant's checkpoints
vary: choosing on it favoured recipes that fit two validation items by luck.

sweep_dir/ config.toml (the sweep), sweep.json (every number), sweep.md (the table, the choice).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import ExperimentSpec, apply_overrides, from_dict, load_experiment, parse_config_file, to_dict
from shared.data import load_dataset
from shared.engine import Engine
from shared.fileio import atomic_write
from shared.metrics import METRIC_DIRECTION
from shared.model import load_base_model
from shared.personalize import METHOD_AUGMENTATION, Context, history_examples
from shared.retrieval import make_retriever
from shared.rundir import new_run_dir
from shared.selection import Selection, ValScore, beats, cross_fitted_gain, train_and_select_users
from shared.tables import markdown_table
from shared.tasks import get_task

from .experiment import open_store
from .inference_sweep import provide_base_adapter, run_inference_sweep
from .reports.run_outputs import signed4


log = logging.getLogger("oppu.sweep")


@dataclass(frozen=True)
class Variant:
    name: str = field(metadata={"help": "Short label of the variant (a row of the table)."})
    set: tuple[str, ...] = field(default=(), metadata={"help": "section.key=value overrides of the experiment."})


SWEEP_MODES = ("personal", "inference", "retrieval")
# What an inference sweep may vary: everything else is the one base + base adapter it scores.
INFERENCE_SECTIONS = ("retrieval", "decoding")
INFERENCE_METHODS = ("non-personalized", "RAG")


@dataclass(frozen=True)
class SweepSpec:
    """One sweep: an experiment config, the method whose personal adapter is swept, the variants."""

    experiment: str = field(metadata={"help": "Experiment TOML the variants start from (relative to the sweep file)."})
    mode: str = field(
        default="personal",
        metadata={"help": "personal: train and select each sweep user's personal adapter per variant | inference: "
                  "score base + base adapter on the users' validation items per variant (no personal training; "
                  "variants may vary only retrieval and decoding) | retrieval: no model, each validation item "
                  "answered by what its retrieved items answered (simulations/inference_sweep.py)."},
    )
    method: str = field(default="OPPU+RAG", metadata={"help": "personal mode: OPPU | OPPU+RAG | OPPU+PAG; "
                                                      "inference and retrieval modes: non-personalized | RAG."})
    users: int = field(default=8, metadata={"help": "Users swept (the experiment's first N evaluated users)."})
    variants: tuple[Variant, ...] = field(default=(), metadata={"help": "[[variants]] name, set."})
    out_dir: str = field(default="runs", metadata={"help": "Where the sweep directory is created."})
    base_adapter_dir: str = field(
        default="",
        metadata={"help": "A base adapter saved by an earlier sweep or experiment on the same experiment config "
                  "(its base_adapter/ directory) to use instead of training one; empty: train it and save it "
                  "into the sweep directory."},
    )

    def __post_init__(self) -> None:
        if self.mode not in SWEEP_MODES:
            raise ValueError(f"sweep.mode={self.mode!r} is not allowed; choose one of {', '.join(SWEEP_MODES)}")
        methods = {"personal": ("OPPU", "OPPU+RAG", "OPPU+PAG"), "inference": INFERENCE_METHODS,
                   "retrieval": ("RAG",)}[self.mode]
        if self.method not in methods:
            raise ValueError(f"sweep.method={self.method!r} is not allowed in {self.mode} mode; choose one of "
                             f"{', '.join(methods)}")
        if self.users <= 0:
            raise ValueError(f"sweep.users={self.users!r} must be > 0")
        if not self.variants:
            raise ValueError("sweep.variants is empty; add [[variants]] tables with name and set")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"sweep.variants: names repeat ({', '.join(names)})")


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, list[ExperimentSpec]]:
    """The sweep and each variant's ExperimentSpec (parsed once, errors naming the variant)."""
    spec = parse_config_file(path, overrides, lambda data: from_dict(SweepSpec, data))
    exp_path = (Path(path).parent / spec.experiment) if not Path(spec.experiment).is_absolute() else Path(spec.experiment)
    base = load_experiment(exp_path)
    specs = []
    for v in spec.variants:
        try:
            specs.append(from_dict(ExperimentSpec, apply_overrides(to_dict(base), list(v.set))))
        except ValueError as e:
            raise ValueError(f"{path}: variant {v.name!r}: {e}") from None
    if spec.mode != "personal":
        fixed = tuple(f.name for f in fields(ExperimentSpec) if f.name not in INFERENCE_SECTIONS + ("out_dir",))
        why = ("an inference sweep scores one base + base adapter without personal training, so only "
               + " and ".join(INFERENCE_SECTIONS) + " may vary")
    else:
        fixed = ("data", "base_model", "base_adapter", "base_train")
        why = ("a sweep compares personal recipes on one base adapter, so only personal_adapter, personal_train, "
               "selection and retrieval may vary")
    for v, s in zip(spec.variants, specs):
        for section in fixed:
            if getattr(s, section) != getattr(base, section):
                raise ValueError(f"{path}: variant {v.name!r} changes [{section}]; {why}")
    return spec, specs


def run_sweep(path: str | Path, overrides: list[str] | None = None, run_dir: Path | None = None, *,
              progress: bool = True) -> Path:
    from tqdm.auto import tqdm

    spec, variants = load_sweep(path, overrides)
    first = variants[0]
    dataset = load_dataset(first.data)
    task = get_task(dataset.task)
    users = dataset.eval_users[: spec.users]
    run_dir = Path(run_dir) if run_dir else new_run_dir(spec.out_dir, f"sweep-{dataset.task}")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.toml", Path(path).read_text() + "".join(f"# --set {o}\n" for o in overrides or []))
    if spec.mode != "personal":
        return run_inference_sweep(spec, variants, dataset, task, users, run_dir, progress=progress)
    started = time.time()
    base_state = None
    rows: dict[str, Any] = {}
    engine = None
    bar = tqdm(total=len(variants) * len(users), desc="sweep", disable=not progress, unit="user")
    for v, exp in zip(spec.variants, variants):
        # A personal adapter's shape is fixed when the engine wraps the model: one engine per
        # personal adapter spec, each given the same base adapter.
        if engine is None or engine.personal_adapter_spec != exp.personal_adapter:
            engine = None  # its wrapped model goes with it
            engine = Engine(load_base_model(first.base_model), exp.base_adapter, exp.personal_adapter,
                            seed=exp.personal_train.seed)
            if base_state is None:
                provide_base_adapter(engine, spec, first, dataset, task, run_dir, progress)
                base_state = {k: t.detach().clone() for k, t in engine.base_state().items()}
            else:
                engine.set_base_state(base_state)
        engine.decoding = exp.decoding
        aug = METHOD_AUGMENTATION[spec.method]
        retriever = make_retriever(exp.retrieval.retriever, task.item_text)
        per_user = []
        t0 = time.time()
        per_pass = exp.personal_train.users_per_pass
        for start in range(0, len(users), per_pass):
            chunk = users[start : start + per_pass]
            stores, examples = [], []
            for user in chunk:
                store = open_store(exp, run_dir / "stores" / v.name / _safe(user.user_id), task)
                store.add(user.history)
                stores.append(store)
                examples.append(history_examples(task, user.history, Context(store, retriever, exp.retrieval), aug))
            decided = train_and_select_users(engine, task, examples, exp.personal_train, exp.selection,
                                             progress=False)
            for store in stores:
                close = getattr(store, "close", None)
                if close is not None:
                    close()
            for user, (tr, sel, _) in zip(chunk, decided):
                last = sel.checks[-1] if sel.checks else None
                per_user.append({"user": user.user_id, "adopted": sel.adopted, "reason": sel.reason,
                                 "base": None if sel.base is None else asdict(sel.base),  # with per-item values
                                 "checks": sel.checks,
                                 "last": last, "selected": _selected(sel), "crossfit": cross_fitted_gain(sel),
                                 "best_step": sel.best_step,
                                 "steps": sel.total_steps, "seconds": tr.seconds})
            bar.update(len(chunk))
        rows[v.name] = {"set": list(v.set), "users": per_user, "seconds": time.time() - t0}
        log.info("variant %s: %s", v.name, _summary(rows[v.name], task.metric_names[0]))
    bar.close()
    metric = task.metric_names[0]
    table, choice = summarize(rows, metric)
    result = {"task": dataset.task, "method": spec.method, "metric": metric, "users": [u.user_id for u in users],
              "base_adapter": spec.base_adapter_dir or str(run_dir / "base_adapter"), "variants": rows, "summary": table, "choice": choice, "seconds": time.time() - started}
    atomic_write(run_dir / "sweep.json", json.dumps(result, indent=2))
    atomic_write(run_dir / "sweep.md", render_sweep(result))
    return run_dir


# Adoption rules a run's recorded checkpoints can be judged under without training anything
# (checkpoints only score: the adapters at each step are the same whichever are scored):
# name -> (which recorded checkpoints the rule sees, adoption rule).
RECORDED_RULES = {
    "selection over every recorded checkpoint": (slice(None), "better"),
    "selection on the last checkpoint only": (slice(-1, None), "better"),
    "always adopt the last checkpoint": (slice(-1, None), "last"),
}


def recorded_rules(run_dir: Path) -> str:
    """Adoption rules compared on a finished experiment's validation records (users/*/selection.json:
    per user and personal method, base's and each scored checkpoint's per-item validation scores;
    no query is read): per rule the users adopted and the cross-fitted gain with its 95% bootstrap
    CI over users (shared.selection.cross_fitted_gain), as a markdown table."""
    files = sorted(Path(run_dir).glob("users/*/selection.json"))
    if not files:
        raise FileNotFoundError(f"{run_dir} holds no users/*/selection.json; give an experiment run directory "
                                f"(e.g. runs/quality/<time>-amazon-title)")
    records = []
    for f in files:
        try:
            records.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: not a readable selection record ({e}); rerun that experiment") from None
    rows = []
    for aug in sorted({a for r in records for a in r}):
        for name, (keep, rule) in RECORDED_RULES.items():
            gains, adopted, users, metric = [], 0, 0, ""
            for f, r in zip(files, records):
                rec = r.get(aug)
                if not rec or rec.get("base") is None or not rec.get("checks"):
                    continue  # nothing trained or scored for this user
                try:
                    metric = rec["metric"]
                    base = ValScore(**rec["base"])
                    sel = Selection(adopted=False, reason="", metric=metric, train_items=rec["train_items"],
                                    validation_items=rec["validation_items"], base=base,
                                    checks=list(rec["checks"])[keep], rule=rule)
                except (KeyError, TypeError) as e:
                    raise ValueError(f"{f}: the {aug!r} record lacks {e} (written by an "
                                     f"older oppu?); rerun that experiment") from None
                gain = cross_fitted_gain(sel)
                if gain is None:
                    continue  # scores without per-item values
                users += 1
                gains.append(gain)
                adopted += rule == "last" or any(
                    beats(ValScore(loss=c["loss"], metric=c["metric"]), base, metric) for c in sel.checks)
            mean, lo, hi = _ci(gains)
            rows.append([aug, name, f"{adopted}/{users}", f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]" if gains else "-"])
    return markdown_table(["prompt", "rule", "adopted", f"cross-fitted {metric} gain [95% CI]"], rows)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


def _selected(sel: Any) -> dict[str, float] | None:
    chosen = sel.best if sel.adopted and sel.best is not None else sel.base
    return None if chosen is None else {"loss": chosen.loss, "metric": chosen.metric}


def _gains(users: list[dict[str, Any]], key: str, metric: str) -> tuple[list[float], list[float]]:
    """Per user: (metric gain, loss fall) of `key` ("last" | "selected") over base, positive = better."""
    sign = 1.0 if METRIC_DIRECTION.get(metric, "higher") == "higher" else -1.0
    mg, lg = [], []
    for u in users:
        if u["base"] is None or u.get(key) is None:
            continue
        mg.append(sign * (u[key]["metric"] - u["base"]["metric"]))
        lg.append(u["base"]["loss"] - u[key]["loss"])
    return mg, lg


def _ci(values: list[float], seed: int = 0, n_boot: int = 2000) -> tuple[float, float, float]:
    """Mean and 95% bootstrap CI over users."""
    if not values:
        return float("nan"), float("nan"), float("nan")
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return float(x.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def _summary(row: dict[str, Any], metric: str) -> str:
    mg, lg = _gains(row["users"], "selected", metric)
    adopted = sum(u["adopted"] for u in row["users"])
    return f"adopted {adopted}/{len(row['users'])}, selected {metric} gain {np.mean(mg) if mg else float('nan'):+.4f}"


def summarize(rows: dict[str, Any], metric: str) -> tuple[list[dict[str, Any]], str]:
    table = []
    for name, row in rows.items():
        us = row["users"]
        base = [u["base"]["metric"] for u in us if u["base"]]
        sel_m = [u["selected"]["metric"] for u in us if u["selected"]]
        last_mg, last_lg = _gains(us, "last", metric)
        sel_mg, _ = _gains(us, "selected", metric)
        crossfit = [u["crossfit"] for u in us if u.get("crossfit") is not None]
        table.append({"variant": name, "set": row["set"], "users": len(us),
                      "adopted": sum(u["adopted"] for u in us),
                      "base_metric": float(np.mean(base)) if base else float("nan"),
                      "selected_metric": float(np.mean(sel_m)) if sel_m else float("nan"),
                      "selected_gain": _ci(sel_mg), "crossfit_gain": _ci(crossfit),
                      "last_gain": _ci(last_mg), "last_loss_fall": _ci(last_lg),
                      "seconds": row["seconds"]})
    sign = 1.0 if METRIC_DIRECTION.get(metric, "higher") == "higher" else -1.0

    def key(r: dict[str, Any]) -> tuple[float, float]:
        def num(x: float) -> float:
            return x if x == x else float("-inf")

        # The honest estimate where the scores carry per-item values (every sweep since they do).
        gain = r.get("crossfit_gain", (float("nan"),))[0]
        first = gain if gain == gain else sign * r["selected_metric"]
        return (num(first), num(r["last_loss_fall"][0]))

    choice = max(table, key=key)["variant"]
    return table, choice


def render_sweep(result: dict[str, Any]) -> str:
    metric = result["metric"]
    arrow = "↑" if METRIC_DIRECTION.get(metric, "higher") == "higher" else "↓"

    def ci(t: tuple[float, float, float]) -> str:
        return f"{signed4(t[0])} [{signed4(t[1])}, {signed4(t[2])}]"

    rows = [[r["variant"] + (" **(chosen)**" if r["variant"] == result["choice"] else ""),
             " ".join(r["set"]) or "(config as is)", f"{r['adopted']}/{r['users']}", f"{r['base_metric']:.4f}",
             f"{r['selected_metric']:.4f}", ci(r["selected_gain"]),
             ci(r.get("crossfit_gain", (float("nan"),) * 3)), ci(r["last_gain"]), ci(r["last_loss_fall"]),
             f"{r['seconds']:.0f}"] for r in result["summary"]]
    header = ["variant", "overrides", "adopted", f"base {metric} {arrow}", f"selected {metric} {arrow}",
              "selected gain [95% CI]", "cross-fitted gain [95% CI]", "last-checkpoint gain [95% CI]",
              "last-checkpoint loss fall [95% CI]", "s"]
    return "\n".join([
        f"# Recipe sweep: {result['task']}, {result['method']}, {len(result['users'])} users (validation only)", "",
        markdown_table(header, rows), "",
        f"Validation = each user's most recent history items (selection.validation_fraction); queries are never "
        f"read. 'base' is base + base adapter under the method's prompt; 'selected' is what selection keeps "
        f"(adopted checkpoint, else base), chosen on the items it is scored on and so optimistic; "
        f"'cross-fitted' is selection picking on all validation items but one and scored on the one left "
        f"out, in turn (an honest estimate of the rule); gains are over base, positive = better, 95% "
        f"bootstrap CI over users. Chosen: **{result['choice']}** (best cross-fitted gain, then "
        f"last-checkpoint loss). Wall time {result['seconds']:.0f} s.", ""])
