"""Federation membership: the daemon runs a Flower SuperNode as a supervised child process.

Joining a coordinator means running

    flower-supernode --root-certificates CA [--auth-supernode-private-key KEY] | --insecure
                     [--trusted-entities FILE] --isolation subprocess
                     --superlink HOST:PORT --node-config "data-dir='DIR'"
                     --host 127.0.0.1 --port <free loopback port> --max-retries N --max-wait-time S

(`--port` is the SuperNode's runtime API, which its ClientApp process connects to; Flower's
default, 9094, would clash between two users' daemons on one machine) in its own process group,
dying with the daemon and holding its data-directory lock (client/lifetime.py), with the client's
own artifact cache and quota as node config (`cache-dir`, `artifact-quota-mb`: the coordinator
never picks them), so federated rounds execute the same ClientApp (client/client_app.py,
started by the SuperNode in a subprocess) against this user's data directory.

Secure by default: the connection uses TLS with the configured CA; plain text only when the user
opted in (daemon.insecure = true, `oppu client daemon --insecure`); with neither the daemon does
not start. The ClientApp runs in a separate process (`--isolation subprocess`) whose command,
`flwr-clientapp`, resolves first to the daemon's gate (client/appgate.py), which runs only app
bundles the user trusts (daemon.trusted_app_hashes; daemon.trusted_entities is Flower's own
signature check in the SuperNode). The local API never
waits for it: rounds run in other processes, and this module only watches the child from a
thread. When the child exits (the coordinator is unreachable, a crash), it is restarted after an
exponential back-off (initial, doubling, capped, +-20% jitter; reset after a run that lasted
`stable_after` seconds), and every exit is logged. Its output goes to DIR/logs/supernode.log.
Flower's telemetry and update check are switched off in the child's environment.

The contract with the ClientApp, through the data directory (node config key `data-dir`):

- it reads the history from DIR/history/history.snapshot.jsonl (client/snapshot.py), which the
  daemon rewrites atomically before this process starts and after every change it acknowledges;
  it never opens the Chroma store there, which only the daemon owns (DIR/history/owner.lock), and
  writes nothing under DIR/history;
- it publishes a personal adapter only through client.personal.PersonalAdapters(DIR/personal),
  which versions it atomically under a file lock (the daemon picks up the new CURRENT);
- it may save the shared base adapter it receives to DIR/base_adapter with
  shared.adapters.write_adapter_dir (atomic; the daemon reloads it when its manifest changes);
- after each round it rewrites DIR/federation.json atomically (shared.fileio.atomic_write):

      {"rounds": int >= 0,            federated rounds this node took part in
       "epsilon": float | null,       privacy spent so far at `delta` (null: no DP accounting)
       "delta": float | null,
       "updated": float}              unix time of the write

  The daemon only reads it (GET /v1/status, "privacy"); a missing file means no rounds yet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from client.appgate import AppTrust, gated_path, install_gate
from client.lifetime import clear_marker, pdeathsig_preexec, stop_group, write_marker
from client.settings import parse_host_port

log = logging.getLogger(__name__)

FEDERATION_FILE = "federation.json"


def read_privacy(data_dir: str | Path) -> dict[str, Any]:
    """The privacy spent in federated rounds, from DIR/federation.json (see the module docstring)."""
    path = Path(data_dir) / FEDERATION_FILE
    empty = {"rounds": 0, "epsilon": None, "delta": None, "updated": None}
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return empty
    except (OSError, ValueError) as e:
        return {**empty, "error": f"{path.name} is unreadable: {e}"}
    if not isinstance(data, dict):
        return {**empty, "error": f"{path.name} must hold a JSON object"}
    out = dict(empty)
    rounds = data.get("rounds", 0)
    if isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 0:
        out["rounds"] = rounds
    else:
        out["error"] = f"{path.name}: rounds={rounds!r} is not a count"
    for key in ("epsilon", "delta", "updated"):
        v = data.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
            out[key] = float(v)
        else:
            out["error"] = f"{path.name}: {key}={v!r} is not a non-negative number"
    return out


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supernode_command(executable: str, coordinator: str, data_dir: Path, *, port: int,
                      max_retries: int = 3, max_wait_time: float = 60.0, root_certificates: str = "",
                      insecure: bool = False, auth_private_key: str = "", trusted_entities: str = "",
                      cache_dir: Path | None = None, artifact_quota_mb: float | None = None) -> list[str]:
    """The SuperNode command line for one data directory (see the module docstring).

    With `root_certificates` (the CA that signed the SuperLink's certificate) the node connects
    over TLS; with `auth_private_key` as well it authenticates itself (Flower node
    authentication, which Flower allows only over TLS). Plain text (--insecure) only with
    `insecure=True`; with neither, ValueError says what to set."""
    parse_host_port(coordinator, "coordinator")
    d = str(Path(data_dir).resolve())
    if "'" in d or any(c in d for c in "\n\r"):
        # Flower parses node config as TOML; a literal string ('...') cannot hold these.
        raise ValueError(f"data directory {d!r} contains a quote or newline; Flower's --node-config cannot carry it")
    transport = transport_args(coordinator, root_certificates=root_certificates, insecure=insecure,
                               auth_private_key=auth_private_key)
    trust = ["--trusted-entities", _existing(trusted_entities, "daemon.trusted_entities")] if trusted_entities else []
    return [
        *_resolve(shlex.split(executable)), *transport, *trust, "--isolation", "subprocess",
        "--superlink", coordinator, "--node-config", f"data-dir='{d}'" + _client_limits(cache_dir, artifact_quota_mb),
        "--host", "127.0.0.1", "--port", str(port),
        "--max-retries", str(max_retries), "--max-wait-time", str(max_wait_time),
    ]


def transport_args(coordinator: str, *, root_certificates: str, insecure: bool, auth_private_key: str) -> list[str]:
    """TLS with the configured CA, or plain text when (and only when) the user opted in."""
    if insecure and root_certificates:
        raise ValueError("daemon.insecure = true and daemon.coordinator_root_certificates are both set: choose one "
                         "(the CA for TLS, or insecure = true for an unencrypted connection)")
    if auth_private_key and not root_certificates:
        raise ValueError("daemon.supernode_auth_key needs TLS: set daemon.coordinator_root_certificates too "
                         "(Flower authenticates nodes over TLS connections only)")
    if insecure:
        return ["--insecure"]
    if not root_certificates:
        raise ValueError(
            f"daemon.coordinator = {coordinator!r} needs TLS: set coordinator_root_certificates = \"/path/to/ca.crt\" "
            "(the CA certificate, PEM, that signed the SuperLink's certificate) in daemon.toml or with "
            "--set coordinator_root_certificates=PATH; or, to send federation traffic unencrypted, opt in with "
            "insecure = true (oppu client daemon --insecure)")
    out = ["--root-certificates", _existing(root_certificates, "daemon.coordinator_root_certificates")]
    if auth_private_key:
        out += ["--auth-supernode-private-key", _existing(auth_private_key, "daemon.supernode_auth_key")]
    return out


def _client_limits(cache_dir: Path | None, artifact_quota_mb: float | None) -> str:
    """Node config keys with the client's own artifact cache and quota (client.rounds.node_from):
    the daemon's settings decide them, never the coordinator's run config."""
    out = ""
    if cache_dir is not None:
        c = str(Path(cache_dir).expanduser().resolve())
        if "'" in c or any(ch in c for ch in "\n\r"):
            raise ValueError(f"artifact cache {c!r} contains a quote or newline; Flower's --node-config cannot carry it")
        out += f" cache-dir='{c}'"
    if artifact_quota_mb is not None:
        out += f" artifact-quota-mb={float(artifact_quota_mb)!r}"
    return out


def transport_name(*, insecure: bool, auth_private_key: str = "") -> str:
    """How the node talks to the coordinator, for status: "tls", "tls+node-auth" or "insecure"."""
    return "insecure" if insecure else ("tls+node-auth" if auth_private_key else "tls")


def _existing(path: str, setting: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{setting}={path!r}: no such file")
    return str(p.resolve())


def _resolve(argv: list[str]) -> list[str]:
    """Find a bare executable name next to this Python first (a venv's bin/ need not be on PATH)."""
    if not argv:
        raise ValueError("daemon.supernode_command is empty")
    if "/" not in argv[0]:
        beside = Path(sys.executable).parent / argv[0]
        if beside.is_file() and os.access(beside, os.X_OK):
            return [str(beside), *argv[1:]]
        found = shutil.which(argv[0])
        if found:
            return [found, *argv[1:]]
    return argv


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The SuperNode starts `flower-superexec` (which starts the ClientApp) by name from PATH.
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    return env


def next_delay(failures: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential back-off: initial * 2**(failures-1), capped at `maximum`, with +-20% jitter."""
    base = min(maximum, initial * (2 ** max(0, failures - 1)))
    jitter = (rng or random).uniform(0.8, 1.2)
    return min(maximum, base * jitter)


class Supervisor:
    """Keep one child command running; restart it with back-off; never block the caller.

    `make_command()` is called before every start (so a fresh free port is picked each time).
    The child dies with this process (client/lifetime.py: parent-death signal); it inherits
    `pass_fds` (the daemon's data-directory lock); with `marker_dir` its process group is recorded
    there while it runs, for the next daemon start to reap should it outlive this one.
    """

    def __init__(self, make_command: Any, *, name: str, log_path: Path, initial: float = 2.0,
                 maximum: float = 300.0, stable_after: float = 120.0, env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = (), marker_dir: Path | None = None) -> None:
        self._make_command = make_command
        self.name = name
        self.log_path = Path(log_path)
        self.initial, self.maximum, self.stable_after = initial, maximum, stable_after
        self._env = env
        self._pass_fds = tuple(pass_fds)
        self._marker_dir = Path(marker_dir) if marker_dir is not None else None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self.state = "stopped"
        self.starts = 0
        self.failures = 0  # consecutive short-lived runs
        self.last_exit: int | None = None
        self.last_error: str | None = None
        self.next_start: float | None = None
        self.delays: list[float] = []  # every back-off waited, for status and tests

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"oppu-{self.name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                cmd = self._make_command()
                with open(self.log_path, "ab") as out:
                    out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {shlex.join(cmd)}\n".encode())
                    out.flush()
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            env=self._env, start_new_session=True, pass_fds=self._pass_fds,
                                            preexec_fn=pdeathsig_preexec())
                if self._marker_dir is not None:
                    write_marker(self._marker_dir, proc.pid)
                with self._lock:
                    self._proc, self.state, self.next_start = proc, "running", None
                    self.starts += 1
                log.info("%s started (pid %d): %s", self.name, proc.pid, shlex.join(cmd))
                rc = proc.wait()
                stop_group(proc.pid)  # its children (superexec, ClientApp) go with it
                if self._marker_dir is not None:
                    clear_marker(self._marker_dir)
                with self._lock:
                    self._proc, self.last_exit = None, rc
                if self._stop.is_set():
                    break
                self.last_error = f"exited with code {rc}"
            except (OSError, ValueError) as e:
                self.last_error = f"cannot start: {e}"
                rc = None
            ran = time.monotonic() - started
            self.failures = 1 if ran >= self.stable_after else self.failures + 1
            delay = next_delay(self.failures, self.initial, self.maximum)
            self.delays.append(delay)
            with self._lock:
                self.state, self.next_start = "backoff", time.time() + delay
            log.warning("%s %s after %.0fs (coordinator unreachable or the node failed; see %s); "
                        "retrying in %.1fs", self.name, self.last_error, ran, self.log_path, delay)
            self._stop.wait(delay)
        with self._lock:
            self.state = "stopped"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child (SIGTERM to its process group, SIGKILL after `timeout`) and the watcher."""
        self._stop.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def status(self) -> dict[str, Any]:
        with self._lock:
            proc = self._proc
            return {
                "state": self.state, "pid": proc.pid if proc is not None else None, "starts": self.starts,
                "consecutive_failures": self.failures, "last_exit_code": self.last_exit,
                "last_error": self.last_error,
                "next_retry_in_s": round(max(0.0, self.next_start - time.time()), 1) if self.next_start else None,
                "log": str(self.log_path),
            }


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own session (start_new_session=True)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def supernode_supervisor(coordinator: str, data_dir: Path, *, executable: str = "flower-supernode",
                         initial: float = 2.0, maximum: float = 300.0, root_certificates: str = "",
                         insecure: bool = False, auth_private_key: str = "",
                         trust: AppTrust | None = None, lock_fd: int | None = None, cache_dir: Path | None = None,
                         artifact_quota_mb: float | None = None) -> Supervisor:
    """A Supervisor that keeps this data directory's SuperNode connected to `coordinator`, its
    ClientApps behind the app-bundle gate (client/appgate.py); without `trust`, no bundle runs.
    The node holds the daemon's data-directory lock `lock_fd` too and is recorded in
    DIR/supernode.json (client/lifetime.py)."""
    data_dir = Path(data_dir)
    trust = trust or AppTrust(coordinator=coordinator, data_dir=str(data_dir.resolve()))
    opts = {"root_certificates": root_certificates, "insecure": insecure, "auth_private_key": auth_private_key,
            "trusted_entities": trust.trusted_entities}
    opts.update(cache_dir=cache_dir, artifact_quota_mb=artifact_quota_mb)  # the client's own paths and limits
    supernode_command(executable, coordinator, data_dir, port=1, **opts)  # validate now, not in the thread
    env = child_env()
    env["PATH"] = gated_path(install_gate(trust), env["PATH"])

    def command() -> list[str]:
        install_gate(trust)  # rewritten at every start: the gate must be there whenever a ClientApp starts
        return supernode_command(executable, coordinator, data_dir, port=free_loopback_port(), **opts)

    return Supervisor(command, name="supernode", log_path=data_dir / "logs" / "supernode.log", initial=initial,
                      maximum=maximum, env=env, pass_fds=() if lock_fd is None else (lock_fd,), marker_dir=data_dir)
