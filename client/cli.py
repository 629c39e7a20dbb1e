"""`oppu client ...`: the parser of the client's commands (client/commands.py does what they do).

The commands find the running daemon through DIR/daemon.json and authenticate with DIR/token,
so they need only `--data-dir` (default $OPPU_CLIENT_DIR or ~/.local/share/oppu/client). This
module imports only the standard library: the parser is built for every `oppu --help`, which
stays instant; a command's code loads when it runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_client_commands(sub: Any) -> None:
    """Register `oppu client <command>` on the top-level subparsers."""
    p = sub.add_parser("client", help="the personal daemon on this machine and commands that talk to it")
    cs = p.add_subparsers(dest="client_command", required=True)
    p.set_defaults(func=run_command)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data-dir", help="the daemon's data directory (default: $OPPU_CLIENT_DIR or "
                       "~/.local/share/oppu/client)")
        q.add_argument("--url", help="daemon URL (default: read from DIR/daemon.json)")
        q.add_argument("--token-file", help="bearer token file (default: DIR/token)")

    q = cs.add_parser("daemon", help="run the daemon (local API, training, federation membership)")
    q.add_argument("--data-dir", help="where history, adapters and the token live (created 0700)")
    q.add_argument("--coordinator", metavar="HOST:PORT", help="join this Flower SuperLink as a SuperNode (over TLS: "
                   "set coordinator_root_certificates, or opt out with --insecure)")
    q.add_argument("--insecure", action="store_true", help="join the coordinator over an unencrypted connection "
                   "(the setting insecure = true; status shows it)")
    q.add_argument("--config", help="daemon TOML (default: DIR/daemon.toml when present)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. --set "
                   "retrain_after=100 or --set base_model.threads=2 (repeatable)")
    q.add_argument("--port", type=int, help="API port on 127.0.0.1 (0 picks a free one)")
    q.add_argument("--task", help="task of the history items (oppu tasks lists them)")
    q.add_argument("--model", help="base model directory (default: the embedded SmolLM2-135M-Instruct)")
    q.add_argument("--quantization", help="nf4 | int8 | none")
    q.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    q.add_argument("--device", help="auto | cpu | cuda")

    q = cs.add_parser("add", help="add history items from a JSON / JSONL file ('-' reads stdin)")
    common(q)
    q.add_argument("file", help='items as {"id", "fields": {...}, "time"} or flat LaMP profile objects')
    q.add_argument("--batch", type=int, default=500, help="items per request")

    q = cs.add_parser("delete", help="delete one history item (the next training no longer sees it)")
    common(q)
    q.add_argument("id", help="the item's id (as added; `oppu client search` shows ids)")

    q = cs.add_parser("search", help="top-k history items for a query")
    common(q)
    q.add_argument("query")
    q.add_argument("-k", type=int, default=5)

    q = cs.add_parser("ask", help="ask the personalized model")
    common(q)
    q.add_argument("text", nargs="?", help="the question (or give --field NAME=VALUE)")
    q.add_argument("--field", action="append", metavar="NAME=VALUE", help="an item field to build the question from")
    q.add_argument("--no-personal", action="store_true", help="answer without the personal adapter")
    q.add_argument("--json", action="store_true", help="print the full JSON answer")

    q = cs.add_parser("train", help="train the personal adapter now (shows progress; Ctrl-C cancels)")
    common(q)
    q.add_argument("--epochs", type=float)
    q.add_argument("--lr", type=float)
    q.add_argument("--detach", action="store_true", help="start the job and return")

    q = cs.add_parser("jobs", help="recent jobs")
    common(q)

    q = cs.add_parser("cancel", help="cancel a job")
    common(q)
    q.add_argument("job")

    q = cs.add_parser("status", help="base model, adapters, history, privacy spent, federation")
    common(q)
    q.add_argument("--json", action="store_true")

    q = cs.add_parser("export", help="write history + adapter + manifest to one archive")
    common(q)
    q.add_argument("dest", help="archive to write (.tar.gz)")

    q = cs.add_parser("import", help="import an archive written by export")
    common(q)
    q.add_argument("src")

    q = cs.add_parser("forget", help="delete your history store and every personal-adapter version")
    common(q)
    q.add_argument("--yes", action="store_true", help="do not ask for confirmation (needed without a terminal)")


def run_command(args: argparse.Namespace) -> int:
    from client import commands  # the daemon, httpx and tqdm load when a command runs

    return commands.run(args)
