"""The HTTP client of `oppu client` commands: finds the running daemon and talks to its local API.

It finds the daemon through DIR/daemon.json and authenticates with DIR/token. Before sending the
token it checks that the process at that address proves it holds it (GET /identity,
`verify_daemon`): a stale daemon.json never hands the token to whoever took the port since.
"""

from __future__ import annotations

import argparse
import hmac
import json
import secrets
from pathlib import Path
from typing import Any

import httpx

from .daemon import IDENTITY_PATH, identity_proof, resolve_data_dir


class ApiError(RuntimeError):
    """A request the daemon refused (`status`: its HTTP status; `job`: the job it named), or no
    daemon to ask (status 0)."""

    def __init__(self, message: str, status: int = 0, job: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.job = job


class Api:
    def __init__(self, args: argparse.Namespace) -> None:
        d = resolve_data_dir(args.data_dir)
        url, pid = args.url, None
        if not url:
            try:
                info = json.loads((d / "daemon.json").read_text())
                url, pid = info["url"], info["pid"]
            except FileNotFoundError:
                raise ApiError(f"no daemon is running for {d} (no daemon.json); start one with "
                               f"`oppu client daemon --data-dir {d}`") from None
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ApiError(f"{d / 'daemon.json'} is unreadable ({type(e).__name__}: {e}); "
                               f"start the daemon again: `oppu client daemon --data-dir {d}`") from None
        token_path = Path(args.token_file) if args.token_file else d / "token"
        try:
            token = token_path.read_text().strip()
        except FileNotFoundError:
            raise ApiError(f"{token_path} is missing; the daemon creates it on first start") from None
        self.url = url.rstrip("/")
        verify_daemon(self.url, token, expected_pid=pid, data_dir=d)
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"},
                                   timeout=httpx.Timeout(600.0, connect=5.0))

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.client.request(method, path, **kw)
        except httpx.ConnectError:
            raise ApiError(f"cannot reach the daemon at {self.url}; is it running?") from None
        return self._check(r)

    @staticmethod
    def _check(r: Any) -> Any:
        if r.status_code >= 400:
            job = None
            try:
                body = r.json()
                detail, job = body.get("detail"), body.get("job")
            except ValueError:
                detail = r.text
            if isinstance(detail, list):
                detail = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in detail)
            raise ApiError(f"{r.status_code}: {detail}", r.status_code, job if isinstance(job, dict) else None)
        ctype = r.headers.get("content-type", "")
        return r.json() if ctype.startswith("application/json") else r


def verify_daemon(url: str, token: str, *, expected_pid: int | None, data_dir: Path) -> None:
    """Refuse to send the token to a process that cannot prove it holds it (client.daemon.
    identity_proof): after a crash DIR/daemon.json names a port any local process may have taken
    since. With daemon.json, the proven PID must also be the one it records."""
    stale = (f"DIR/daemon.json may be stale (the daemon crashed?): start it again with "
             f"`oppu client daemon --data-dir {data_dir}`")
    nonce = secrets.token_hex(16)
    try:
        r = httpx.get(url + IDENTITY_PATH, params={"nonce": nonce}, timeout=httpx.Timeout(30.0, connect=5.0))
        answer = r.json() if r.status_code == 200 else None
        proof, pid = (answer["proof"], answer["pid"]) if isinstance(answer, dict) else (None, None)
    except httpx.TransportError:
        raise ApiError(f"cannot reach the daemon at {url}; is it running? {stale}") from None
    except (ValueError, KeyError):
        proof, pid = None, None
    if not (isinstance(proof, str) and isinstance(pid, int)
            and hmac.compare_digest(proof, identity_proof(token, nonce, pid))):
        raise ApiError(f"the process at {url} is not the oppu daemon of {data_dir} (it cannot prove it holds "
                       f"the token); the token was not sent. {stale}")
    if expected_pid is not None and pid != expected_pid:
        raise ApiError(f"the daemon at {url} has pid {pid}, but DIR/daemon.json names pid {expected_pid}; {stale}")
