"""The `oppu` command. Subcommands import their packages lazily so `oppu --help` is instant."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _experiment_overrides(args: argparse.Namespace) -> list[str]:
    ov = list(args.set or [])
    if args.task:
        ov.append(f'data.task="{args.task}"')
    if args.users is not None:
        ov.append(f"data.users={args.users}")
    if args.source:
        ov.append(f'data.source="{args.source}"')
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        ov.append("methods=[" + ", ".join(f'"{m}"' for m in methods) + "]")
    if args.model:
        ov.append(f'base_model.path="{args.model}"')
    if args.quantization:
        ov.append(f'base_model.quantization="{args.quantization}"')
    if args.out:
        ov.append(f'out_dir="{args.out}"')
    return ov


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
    from shared.model import read_or_make_manifest, resolve_model_dir

    spec = BaseModelSpec(path=args.model) if args.model else BaseModelSpec()
    directory = resolve_model_dir(spec)
    manifest = read_or_make_manifest(directory)
    print(f"base model ready: {directory}")
    print(f"model hash: {manifest['model_hash']}  ({len(manifest['files'])} files hashed)")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from shared.tasks import TASKS

    for name, task in TASKS.items():
        print(f"{name:18s} {task.kind:15s} metrics: {', '.join(task.metric_names)}")
    return 0


def cmd_export_data(args: argparse.Namespace) -> int:
    """Write a built task (real-data or synthetic) as LaMP files for other tools."""
    from shared.config import load_experiment
    from shared.data import write_lamp
    from simulations.datasets import load_dataset

    spec = load_experiment(args.config, _experiment_overrides(args))
    ds = load_dataset(spec.data)
    out = Path(args.dest)
    write_lamp(out, "train", ds.base_users, ds.task)
    write_lamp(out, "dev", ds.eval_users, ds.task)
    print(json.dumps({"task": ds.task, "source": ds.source, "train_users": len(ds.base_users),
                      "dev_users": len(ds.eval_users), "written_to": str(out)}, indent=2))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Federated OPPU in Flower's simulation engine: N virtual users, R rounds, one command."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from shared.config import load_federated

    overrides = _experiment_overrides(args)
    if args.rounds is not None:
        overrides.append(f"federation.rounds={args.rounds}")
    if args.strategy:
        overrides.append(f'federation.strategy="{args.strategy}"')
    run_dir = Path(args.run_dir) if args.run_dir else None
    config = args.config
    if args.resume:
        run_dir = Path(args.resume)
        config = config or str(run_dir / "config.toml")
    spec = load_federated(config, overrides)
    from simulations.federated import prepare_only, simulate

    if args.prepare_users:
        for d in prepare_only(spec, run_dir):
            print(f"--node-config \"data-dir='{d}'\"")
        return 0
    run_dir = simulate(spec, run_dir, verbose=args.verbose)
    print((run_dir / "results.md").read_text())
    print(f"Run directory: {run_dir}")
    return 0


def _add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment TOML file (see simulations/configs/)")
    p.add_argument("--task", help="task name (oppu tasks lists them)")
    p.add_argument("--users", type=int, help="number of evaluated users")
    p.add_argument("--source", help="auto | real | synthetic | a LaMP directory")
    p.add_argument("--methods", help="comma-separated: non-personalized,RAG,PAG,OPPU,OPPU+RAG,OPPU+PAG")
    p.add_argument("--model", help="base model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quantization", help="nf4 | int8 | none")
    p.add_argument("--out", help="parent directory for run directories (default: runs)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override any setting, e.g. --set personal_train.epochs=3 (repeatable)")


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

    p = sub.add_parser("tasks", help="list the tasks and their metrics")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("export-data", help="write a built task as LaMP-format files")
    _add_experiment_args(p)
    p.add_argument("dest", help="directory to write {train,dev}_questions.json / _outputs.json into")
    p.set_defaults(func=cmd_export_data)

    p = sub.add_parser("simulate", help="federated OPPU with N virtual users in Flower's simulation engine")
    _add_experiment_args(p)
    p.add_argument("--rounds", type=int, help="federated rounds (federation.rounds)")
    p.add_argument("--strategy", help="fedavg | fedadam | fedprox (federation.strategy)")
    p.add_argument("--run-dir", help="write into this directory instead of a new one under --out")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    p.add_argument("--prepare-users", action="store_true",
                   help="only write the users' data directories (for SuperNodes of a deployment) and print them")
    p.set_defaults(func=cmd_simulate)

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
