"""The `oppu` command: argument parsing only; each subcommand calls into simulations/, client/,
coordinator/ or shared/. It sits above all of them (DESIGN.md). Each subcommand imports its
packages inside its function, unlike the rest of the project: `oppu --help` stays instant and the
light commands (tasks, import, client) never load torch, chromadb or Flower."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from shared import environment

environment.apply()  # before any subcommand imports a library that reads it


# Command-line flags as `--set` overrides: (argparse attribute, config key, how the value is written).
# "str": a quoted string; "num": as given; "strs"/"nums": a comma list as a TOML array.
EXPERIMENT_FLAGS = (("task", "data.task", "str"), ("users", "data.users", "num"), ("source", "data.source", "str"),
                    ("methods", "methods", "strs"), ("model", "base_model.path", "str"),
                    ("quantization", "base_model.quantization", "str"), ("out", "out_dir", "str"))
SIMULATE_FLAGS = EXPERIMENT_FLAGS + (
    ("rounds", "federation.rounds", "num"), ("strategy", "federation.strategy", "str"),
    ("select", "data.select", "str"), ("peft", "personal_adapter.peft_type", "str"),
    ("retriever", "retrieval.retriever", "str"), ("k", "retrieval.k", "num"))
ABLATE_FLAGS = (("noise", "grid.noise_multipliers", "nums"), ("clip", "grid.clipping_norms", "nums"),
                ("clients", "grid.clients_per_round", "nums"), ("populations", "grid.populations", "nums"),
                ("rounds", "grid.rounds", "num"), ("layout", "grid.layout", "str"), ("model", "base_model.path", "str"),
                ("quantization", "base_model.quantization", "str"), ("out", "out_dir", "str"))


def flag_overrides(args: argparse.Namespace, flags: tuple[tuple[str, str, str], ...]) -> list[str]:
    """A preset's overrides, then `--set` strings (as typed), then one override per flag given."""
    from shared.config import PRESETS

    preset = getattr(args, "preset", None)
    ov = list(PRESETS[preset]) if preset else []
    ov += list(getattr(args, "set", None) or [])
    for attr, key, kind in flags:
        value = getattr(args, attr, None)
        if value is None or value == "":
            continue
        if kind == "str":
            ov.append(f"{key}={json.dumps(str(value))}")
        elif kind == "num":
            ov.append(f"{key}={value}")
        else:
            items = [v.strip() for v in str(value).split(",") if v.strip()]
            ov.append(f"{key}=[" + ", ".join(json.dumps(v) if kind == "strs" else v for v in items) + "]")
    return ov


def _experiment_overrides(args: argparse.Namespace) -> list[str]:
    return flag_overrides(args, EXPERIMENT_FLAGS)


def cmd_experiment(args: argparse.Namespace) -> int:
    from shared.config import load_experiment

    spec = load_experiment(args.config, _experiment_overrides(args))
    from simulations.experiment import run_experiment

    run_dir = run_experiment(spec, Path(args.run_dir) if args.run_dir else None, progress=not args.quiet)
    print((run_dir / "results.md").read_text())
    print(f"Run directory: {run_dir}")
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from shared.config import BaseModelSpec
    from shared.model_manifest import read_or_make_manifest
    from shared.model_source import resolve_model_dir

    spec = BaseModelSpec(path=args.model) if args.model else BaseModelSpec()
    directory = resolve_model_dir(spec)
    manifest = read_or_make_manifest(directory)
    print(f"base model ready: {directory}")
    print(f"model hash: {manifest['model_hash']}  ({len(manifest['files'])} files hashed)")
    return 0


def cmd_prepare_base_adapter(args: argparse.Namespace) -> int:
    """Train and cache the built-in base adapter the daemon of --data-dir (its settings) uses."""
    import time

    from client.daemon import resolve_spec
    from shared import builtin_base
    from shared.adapters import read_manifest
    from shared.engine import Engine

    data_dir = _client_dir(args)
    ov = list(args.set or []) + ([f"task={json.dumps(args.task)}"] if args.task else [])
    spec = resolve_spec(data_dir, args.config, ov)  # the daemon's settings: the same key it looks up
    t0 = time.perf_counter()
    engine = Engine(spec.base_model, spec.base_adapter, spec.personal_adapter, seed=spec.personal_train.seed)
    recipe = builtin_base.build_recipe(spec.task, spec.builtin_base, model_hash=engine.model_hash,
                                       base_model=spec.base_model, base_adapter=spec.base_adapter,
                                       retrieval=spec.retrieval)
    print(f"base model {engine.model_hash[:12]} loaded in {time.perf_counter() - t0:.1f}s; {recipe.describe()}",
          file=sys.stderr)
    path = builtin_base.prepare(engine, recipe, builtin_base.cache_dir(spec.base_model),
                                on_phase=lambda phase: print(phase, file=sys.stderr), progress="base adapter")
    manifest = read_manifest(path)
    print(f"base adapter for {spec.task} ready: {path}")
    print(f"version {manifest.files.get('adapter_model.safetensors', '')[:12]}, {manifest.train.get('steps')} steps, "
          f"loss {manifest.train.get('final_loss', float('nan')):.3f}; {time.perf_counter() - t0:.0f}s in all")
    return 0


def _client_dir(args: argparse.Namespace) -> Path:
    from client.daemon import resolve_data_dir

    return resolve_data_dir(args.data_dir)


def load_own_tasks(args: argparse.Namespace) -> None:
    """Register the [[tasks]] of --config, else those of the daemon's DIR/daemon.toml when it has one."""
    from shared.config import load_task_file

    path = args.config
    if path is None:
        from client.daemon import CONFIG_FILE

        found = _client_dir(args) / CONFIG_FILE
        path = found if found.is_file() else None
    if path is not None:
        load_task_file(path)


def cmd_tasks(args: argparse.Namespace) -> int:
    from shared.tasks import TASKS, describe_task, get_task

    load_own_tasks(args)
    names = args.names or list(TASKS)
    print("\n\n".join(describe_task(get_task(n)) for n in names))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """A person's own data (JSONL, CSV, git commits) as a history file of a task's items."""
    from shared.data.importers import import_csv, import_git, import_jsonl, parse_mapping, write_history
    from shared.tasks import get_task

    load_own_tasks(args)
    task = get_task(args.task)
    mapping = parse_mapping(args.map or [], task)
    if args.source == "git":
        result = import_git(args.path, args.author, task, mapping, rev=args.rev, max_count=args.max_count or 0)
    else:
        reader = import_jsonl if args.source == "jsonl" else import_csv
        result = reader(args.path, task, mapping, args.ignore or [])
    out = write_history(args.out, result.items)
    print(f"wrote {result.summary()} of task {task.name} to {out}")
    print(f"add them to your history: oppu client add {out}   (the daemon must run with task = \"{task.name}\")")
    return 0


def cmd_export_data(args: argparse.Namespace) -> int:
    """Write a built task (real-data or synthetic) as LaMP files for other tools."""
    from shared.config import load_experiment
    from shared.data import write_lamp
    from shared.data import load_dataset

    spec = load_experiment(args.config, _experiment_overrides(args))
    ds = load_dataset(spec.data)
    out = Path(args.dest)
    write_lamp(out, "train", ds.base_users, ds.task)
    write_lamp(out, "dev", ds.eval_users, ds.task)
    print(json.dumps({"task": ds.task, "source": ds.source, "train_users": len(ds.base_users),
                      "dev_users": len(ds.eval_users), "written_to": str(out)}, indent=2))
    return 0


DEFAULT_SIMULATION = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "simulate.toml"


def _simulate_overrides(args: argparse.Namespace) -> list[str]:
    """The experiment options plus the federation's and the study knobs, as `--set` strings."""
    ov = flag_overrides(args, SIMULATE_FLAGS)
    if args.seed is not None:  # one seed for every random choice of the run
        ov += [f"data.seed={args.seed}", f"base_train.seed={args.seed}", f"personal_train.seed={args.seed}",
               f"federation.seed={args.seed}", f"federation.local_train.seed={args.seed}",
               f"federation.sampling_seed={args.seed}"]  # DP participation and noise too (privacy.json says so)
    return ov


def load_simulation(args: argparse.Namespace) -> tuple[object, Path | None]:
    """The FederatedSpec of `oppu simulate` (default config: simulations/configs/simulate.toml)."""
    from shared.config import load_federated

    run_dir = Path(args.run_dir) if args.run_dir else None
    config = args.config
    if args.resume:
        run_dir = Path(args.resume)
        config = config or str(run_dir / "config.toml")
    config = config or str(DEFAULT_SIMULATION)
    overrides = _simulate_overrides(args)
    spec = load_federated(config, overrides)
    if args.clients_per_round is not None:
        users, n = spec.experiment.data.users, args.clients_per_round
        if not 0 < n <= users:
            raise ValueError(f"--clients-per-round={n} must be between 1 and data.users={users}")
        spec = dataclasses.replace(spec, federation=dataclasses.replace(
            spec.federation, fraction_train=n / users, min_clients=min(n, spec.federation.min_clients)))
    return spec, run_dir


def cmd_simulate(args: argparse.Namespace) -> int:
    """Federated OPPU in Flower's simulation engine: N virtual users, R rounds, one command."""
    spec, run_dir = load_simulation(args)
    from simulations.simulate import prepare_only, simulate

    if args.prepare_users:
        for d in prepare_only(spec, run_dir):
            print(f"--node-config \"data-dir='{d}'\"")
        return 0
    run_dir = simulate(spec, run_dir, verbose=args.verbose)
    print((run_dir / "results.md").read_text())
    print(f"Run directory: {run_dir}")
    return 0


DEFAULT_ABLATION = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "ablate-privacy.toml"


def cmd_ablate(args: argparse.Namespace) -> int:
    from simulations.ablation_spec import load_ablation

    ov = flag_overrides(args, ABLATE_FLAGS)
    spec = load_ablation(args.config or str(DEFAULT_ABLATION), ov)
    from simulations.ablation import run_ablation

    run_dir = run_ablation(spec, Path(args.run_dir) if args.run_dir else None, progress=not args.quiet)
    print((run_dir / "metrics.md").read_text())
    print(f"Run directory: {run_dir}  (page with the plot: {run_dir / 'REPORT.md'})")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from simulations.audit import AuditSpec, render, run_audit, write_audit

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(AuditSpec) if getattr(args, f.name, None) is not None}
    result = run_audit(AuditSpec(**given))
    out = Path(args.out) if args.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-audit-privacy"
    write_audit(result, out)
    print(render(result))
    print(f"Written: {out / 'audit.md'}, {out / 'audit.json'}")
    return 0 if result["consistent"] else 1


DEFAULT_STUDY = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "study.toml"


def cmd_study(args: argparse.Namespace) -> int:
    from shared.config import load_experiment

    spec = load_experiment(args.config or str(DEFAULT_STUDY), _experiment_overrides(args))
    from simulations.studies import run_study

    study_dir = run_study(args.name, spec, Path(args.run_dir) if args.run_dir else None,
                          methods_given=bool(args.methods), progress=not args.quiet)
    print((study_dir / "metrics.md").read_text())
    print(f"Study directory: {study_dir}  (page with the plots: {study_dir / 'REPORT.md'})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from simulations.reports.page import write_report

    out = write_report([Path(r) for r in args.run_dirs], Path(args.out) if args.out else None)
    print(f"Report: {out}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from simulations.reproduce import render, reproduce

    out, result = reproduce(Path(args.run_dir), Path(args.into) if args.into else None,
                            tolerance=args.tolerance, progress=not args.quiet)
    print(render(result))
    print(f"Rerun directory: {out}")
    return 0 if result["reproduced"] else 1


def _add_model_and_out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quantization", help="nf4 | int8 | none")
    p.add_argument("--out", help="parent directory for run directories (default: runs)")


def _add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment TOML file (see simulations/configs/)")
    p.add_argument("--task", help="task name (oppu tasks lists them)")
    p.add_argument("--users", type=int, help="number of evaluated users")
    p.add_argument("--source", help="auto | real | synthetic | a LaMP directory")
    p.add_argument("--methods", help="comma-separated: non-personalized,RAG,PAG,OPPU,OPPU+RAG,OPPU+PAG,centralized")
    _add_model_and_out_args(p)
    p.add_argument("--preset", choices=["paper"],
                   help="paper: the OPPU paper's personal recipe (LoRA r=8 on q/v, lr 1e-4, 2 epochs, BM25 k=1, "
                   "always adopted) instead of the defaults chosen for the embedded model (docs/quality.md)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override any setting, e.g. --set personal_train.epochs=3 (repeatable)")


def cmd_sweep(args: argparse.Namespace) -> int:
    from simulations.sweep import recorded_rules, run_sweep

    if args.rules_from:
        print(recorded_rules(Path(args.rules_from)))
        return 0
    if not args.config:
        raise SystemExit("oppu sweep: give a sweep TOML (e.g. simulations/configs/sweep-amazon-rating.toml), "
                         "or --rules-from RUN_DIR")
    out = run_sweep(args.config, list(args.set or []), Path(args.run_dir) if args.run_dir else None,
                    progress=not args.quiet)
    print((out / "sweep.md").read_text())
    print(f"Sweep directory: {out}")
    return 0


def _add_own_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TOML file whose [[tasks]] tables define tasks of your own "
                   "(default: the daemon's DIR/daemon.toml when present)")
    p.add_argument("--data-dir", help="the daemon's data directory (default: $OPPU_CLIENT_DIR or ~/.local/share/oppu/client)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oppu", description="One PEFT Per User: federated, on-device LLM personalization.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("experiment", help="compare personalization methods on one task and write a run directory")
    _add_experiment_args(p)
    p.add_argument("--run-dir", help="write into this directory instead of a new one under --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("prepare-model", help="convert the embedded base model once and print its hash")
    p.add_argument("--model", help="a local Hugging Face model directory instead of the embedded one")
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("prepare-base-adapter",
                       help="train and cache the base adapter a daemon without a coordinator answers with",
                       description="Trains the shared base adapter of a built-in task from its base users with the "
                       "experiments' recipe and caches it beside the base model (base_model.cache_dir, else "
                       "$OPPU_CACHE or ~/.cache/oppu). The daemon reads its settings from --data-dir's daemon.toml "
                       "(or --config), so this prepares exactly the one it looks up; a daemon that finds none trains "
                       "it at its first start instead (builtin_base.when_missing).")
    p.add_argument("--task", help="the task (default: the daemon's, amazon-rating unless its settings say otherwise)")
    p.add_argument("--config", help="the daemon's settings file (default: DIR/daemon.toml when present)")
    p.add_argument("--data-dir", help="the daemon's data directory (default: $OPPU_CLIENT_DIR or ~/.local/share/oppu/client)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a daemon setting, e.g. --set builtin_base.base_users=20 (repeatable)")
    p.set_defaults(func=cmd_prepare_base_adapter)

    p = sub.add_parser("tasks", help="the tasks: fields, answers, metrics and an example item line")
    p.add_argument("names", nargs="*", metavar="TASK", help="only these tasks")
    _add_own_task_args(p)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("import", help="your own data (JSONL, CSV, git commits) as a history file for `oppu client add`")
    isub = p.add_subparsers(dest="source", required=True)
    for source, what in (("jsonl", "one JSON object per line"), ("csv", "a CSV file with a header line"),
                         ("git", "one author's commits of a git repository (body -> subject)")):
        q = isub.add_parser(source, help=what)
        q.add_argument("path", help="the git repository" if source == "git" else f"the {source.upper()} file")
        if source == "git":
            q.add_argument("--author", required=True, help="author name or email (exact, any case)")
            q.add_argument("--rev", default="HEAD", help="commits reachable from this revision (default HEAD)")
            q.add_argument("--max-count", type=int, help="keep only the newest N items")
        q.add_argument("--task", default="commit-title" if source == "git" else None, required=source != "git",
                       help="the task the items are for (oppu tasks lists them)")
        q.add_argument("--map", action="append", metavar="FIELD=COLUMN",
                       help="fill the task's FIELD (or id, time) from the source's COLUMN, e.g. --map text=body (repeatable)")
        if source != "git":
            q.add_argument("--ignore", action="append", metavar="COLUMN", help="a source column to leave out (repeatable)")
        _add_own_task_args(q)
        q.add_argument("-o", "--out", required=True, help="history file to write ({\"id\", \"fields\", \"time\"} per line)")
        q.set_defaults(func=cmd_import)

    p = sub.add_parser("export-data", help="write a built task as LaMP-format files")
    _add_experiment_args(p)
    p.add_argument("dest", help="directory to write {train,dev}_questions.json / _outputs.json into")
    p.set_defaults(func=cmd_export_data)

    p = sub.add_parser("simulate", help="federated OPPU with N virtual users in Flower's simulation engine",
                       description="Without --config the defaults are simulations/configs/simulate.toml: "
                       "amazon-rating, 6 users, 2 rounds, the embedded model.")
    _add_experiment_args(p)
    p.add_argument("--select", help="how users are chosen: most-history | random | activity (data.select)")
    p.add_argument("--rounds", type=int, help="federated rounds (federation.rounds)")
    p.add_argument("--clients-per-round", type=int, help="users sampled per round (sets federation.fraction_train)")
    p.add_argument("--strategy", help="fedavg | fedadam | fedprox (federation.strategy)")
    p.add_argument("--peft", help="personal adapter type: lora | ia3 | prompt_tuning (personal_adapter.peft_type)")
    p.add_argument("--retriever", help="bm25 | dense | hybrid (retrieval.retriever)")
    p.add_argument("--k", type=int, help="history items retrieved per prompt (retrieval.k)")
    p.add_argument("--seed", type=int, help="one seed for user selection, training and the federation")
    p.add_argument("--run-dir", help="write into this directory instead of a new one under --out")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    p.add_argument("--prepare-users", action="store_true",
                   help="only write the users' data directories (for SuperNodes of a deployment) and print them")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("study", help="one of the paper's studies: activity | shift | format | peft")
    p.add_argument("name", choices=["activity", "shift", "format", "peft"],
                   help="activity: gains by activity level; shift: behaviour shift; format: history format; "
                   "peft: LoRA vs IA3 vs prompt tuning")
    _add_experiment_args(p)
    p.add_argument("--run-dir", help="write the study into this directory instead of a new one under --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("ablate", help="ablation studies (privacy: utility, epsilon and attack AUC over a grid)")
    p.add_argument("what", choices=["privacy"], help="privacy: grid over noise, clipping, clients per round, population")
    p.add_argument("--config", help="ablation TOML (default: simulations/configs/ablate-privacy.toml)")
    p.add_argument("--noise", help="noise multipliers, e.g. 0,0.2,2 (grid.noise_multipliers)")
    p.add_argument("--clip", help="clipping norms, e.g. 0.5,1 (grid.clipping_norms)")
    p.add_argument("--clients", help="clients per round, e.g. 2,4 (grid.clients_per_round)")
    p.add_argument("--populations", help="population sizes, e.g. 4,8 (grid.populations)")
    p.add_argument("--rounds", type=int, help="rounds per cell (grid.rounds)")
    p.add_argument("--layout", help="one-at-a-time | full (grid.layout)")
    _add_model_and_out_args(p)
    p.add_argument("--run-dir", help="write into this directory instead of a new one under --out")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any setting (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("audit", help="empirical privacy audit (privacy: canary users through DP-FedAvg's rounds, "
                                     "a lower bound on epsilon beside the accountant's)")
    p.add_argument("what", choices=["privacy"], help="privacy: the coordinator's DP-FedAvg round (shared/aggregation.py)")
    import dataclasses

    from simulations.audit import AuditSpec  # numpy-only module

    for f in dataclasses.fields(AuditSpec):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default),
                       help=f"{f.metadata['help']} (default {f.default})")
    p.add_argument("--out", help="directory for audit.json and audit.md (default: runs/<time>-audit-privacy)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("sweep", help="choose the personal-training recipe, or retrieval and decoding "
                       "(mode = \"inference\"), on users' validation items only")
    p.add_argument("config", nargs="?", help="sweep TOML (e.g. simulations/configs/sweep-amazon-rating.toml)")
    p.add_argument("--rules-from", metavar="RUN_DIR",
                   help="instead of a sweep: compare adoption rules (every recorded checkpoint, the last only, "
                   "always the last) on a finished experiment's validation records, training nothing")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a sweep setting, e.g. users=4")
    p.add_argument("--run-dir", help="write into this directory instead of a new one under the sweep's out_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="render run directories as one Markdown page with their plots")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (experiment, simulate, study, ablate)")
    p.add_argument("--out", help="Markdown file to write (default: RUN_DIR/REPORT.md for one run, ./report.md for several)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("reproduce", help="rerun a run directory from its config and compare the scores")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--into", help="directory for the rerun (default: RUN_DIR-rerun)")
    p.add_argument("--tolerance", type=float, default=0.0, help="largest accepted |difference| of a score (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)

    from client.cli import add_client_commands  # stdlib-only module; the daemon loads lazily

    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The console shows warnings (INFO with -v); run logs written by commands keep INFO.
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if args.verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(console)
    logging.getLogger().setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"oppu: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
