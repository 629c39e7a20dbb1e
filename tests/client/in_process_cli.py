"""`oppu client ...` run in the test's own process against the app under test (one helper for
every test file that drives the commands)."""

from __future__ import annotations

from typing import Any, Callable

from client import commands
from oppu.cli import build_parser


def in_process_cli(client: Any, monkeypatch: Any, capsys: Any) -> Callable[..., tuple[int, str, str]]:
    """run(*argv) -> (exit code, stdout, stderr) of `oppu client *argv`; its requests go to `client`
    (a TestClient of the daemon's app) and are recorded, as "METHOD path", in run.sent."""
    check, sent = commands.Api._check, []

    class _Api:
        def call(self, method: str, path: str, **kw: Any) -> Any:
            sent.append(f"{method} {path}")
            return check(client.request(method, path, **kw))

    monkeypatch.setattr(commands, "Api", lambda args: _Api())

    def run(*argv: str) -> tuple[int, str, str]:
        args = build_parser().parse_args(["client", *argv])
        rc = args.func(args)
        out = capsys.readouterr()
        return rc, out.out, out.err

    run.sent = sent  # type: ignore[attr-defined]
    return run
