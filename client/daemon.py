"""`oppu client daemon`: one long-running process per user's data directory.

It owns the user's history store and private adapter, answers their requests with the
personalized model over a local HTTP API (client/api.py), trains in the background
(client/jobs.py), and, given a coordinator, takes part in federated rounds through a supervised
Flower SuperNode (client/supernode.py, which documents the ClientApp contract, including
DIR/federation.json for the privacy spent).

The data directory (mode 0700):

    daemon.toml       optional settings (shared.config.DaemonSpec); --config and --set override
    daemon.lock       flock held while a daemon runs, and by its SuperNode; holds the daemon's PID
                      (a second daemon refuses)
    supernode.json    the running SuperNode's process group (client/lifetime.py)
    daemon.json       {"pid", "url", "port", "started"} while running: how `oppu client` finds it
    token             the API's bearer token, created on first start, mode 0600
    state.json        the task this directory holds
    history/          the Chroma history store (client.store) and the PAG profile; owner.lock (flock:
                      the daemon is the store's only opener) and history.snapshot.jsonl, the
                      read-only copy the SuperNode's ClientApp reads (client/snapshot.py)
    personal/         versioned personal adapters and CURRENT (client.personal)
    base_adapter/     the federation's base adapter, when a coordinator sent one (without one, and
                      without base_adapter_dir, the built-in one cached for the task answers:
                      shared/builtin_base.py)
    jobs/             one JSON record per training job (client.jobs)
    federation.json   privacy spent in federated rounds (written by the ClientApp)
    logs/             daemon.log, supernode.log
    tmp/              imports and exports in flight

Shutdown: SIGTERM or SIGINT stops accepting connections, lets requests in flight finish, cancels
a running training job (the published adapter is untouched; the job is recorded as cancelled),
stops the SuperNode's process group, and releases the lock. After a SIGKILL the kernel kills the
SuperNode too (parent-death signal) and releases the lock; the next start stops anything of the old
node's process group still running (client/lifetime.py), then reports the interrupted job and
removes half-written adapter versions.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import logging.handlers
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from client.lifetime import reap_orphans
from client.settings import DaemonSpec, load_daemon
from shared.fileio import atomic_write, create_new

log = logging.getLogger("oppu.daemon")

LOCK_FILE = "daemon.lock"
INFO_FILE = "daemon.json"
TOKEN_FILE = "token"
CONFIG_FILE = "daemon.toml"


class DaemonLocked(RuntimeError):
    """Another daemon holds the data directory."""


def resolve_data_dir(given: str | None) -> Path:
    """The data directory a command names (--data-dir), else $OPPU_CLIENT_DIR, else
    $XDG_DATA_HOME/oppu/client (~/.local/share/oppu/client)."""
    if given:
        return Path(given).expanduser()
    env = os.environ.get("OPPU_CLIENT_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "oppu" / "client"


def prepare_dir(data_dir: Path) -> Path:
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(data_dir.stat().st_mode)
    if mode & 0o077:
        log.warning("%s is readable by other users (mode %o); it will hold your private history — "
                    "consider chmod 700", data_dir, mode)
    return data_dir


def acquire_lock(data_dir: Path) -> int:
    """Lock the data directory for this process; DaemonLocked names the holder's PID."""
    path = Path(data_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        try:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise DaemonLocked(f"{data_dir} is in use by another oppu daemon (pid {holder}); stop it first "
                           "(kill -TERM " + holder + ") or use another --data-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    return fd  # kept open: the lock lives as long as this descriptor


def lock_data_dir(data_dir: Path) -> int:
    """Take the data-directory lock, first stopping what a killed daemon left behind.

    The SuperNode holds the lock with its daemon (client/lifetime.py). If a daemon died and its
    SuperNode survived it, that orphan still holds the lock: it is stopped (its daemon, recorded in
    DIR/supernode.json, is gone) and the lock taken. With the lock held, surviving processes of the
    old node's group (the ClientApp) are stopped too, before crash recovery looks at temporary files."""
    try:
        fd = acquire_lock(data_dir)
    except DaemonLocked:
        if not reap_orphans(data_dir):
            raise
        fd = acquire_lock(data_dir)
    try:
        reap_orphans(data_dir)
    except BaseException:
        release_lock(fd)
        raise
    return fd


def release_lock(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def ensure_token(data_dir: Path) -> str:
    """The API token: created once, complete or not at all (written under a temporary name with
    mode 0600, then linked into place; shared.fileio.create_new), re-tightened if its permissions
    were widened. A racing second start (or a reader) never sees an empty or partial token."""
    path = Path(data_dir) / TOKEN_FILE
    if not path.exists() and not path.is_symlink():
        if create_new(path, secrets.token_urlsafe(32) + "\n", mode=0o600):
            log.info("created the API token in %s (mode 0600)", path)
    if path.is_symlink() or not path.is_file():
        raise RuntimeError(f"{path} is not a regular file; remove it and start again")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s had mode %o; restricting it to the owner (0600)", path, mode)
        os.chmod(path, 0o600)
    token = path.read_text().strip()
    if len(token) < 32:
        raise RuntimeError(f"{path} does not hold a valid token; remove it to create a new one")
    return token


IDENTITY_PATH = "/identity"


def identity_proof(token: str, nonce: str, pid: int) -> str:
    """What the daemon answers on GET /identity?nonce=N, unauthenticated: an HMAC of the nonce and
    its PID keyed by the token. The CLI checks it before it sends the token, so a process that took
    over the port of a stale DIR/daemon.json (the daemon crashed) never receives the token: it
    cannot compute the proof without it."""
    message = f"oppu-daemon-identity\n{nonce}\n{pid}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def bind_socket(host: str, port: int) -> socket.socket:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"refusing to listen on {host}: the API binds loopback addresses only")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port} ({e.strerror}); choose another with --port "
                           "(0 picks a free one)") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def _setup_logging(data_dir: Path, verbose: bool) -> logging.Handler:
    """Log INFO and up to DIR/logs/daemon.log (returned, to be removed when the daemon stops)."""
    (data_dir / "logs").mkdir(exist_ok=True, mode=0o700)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    file_handler = logging.handlers.RotatingFileHandler(data_dir / "logs" / "daemon.log", maxBytes=5 << 20,
                                                        backupCount=3)
    file_handler.setFormatter(fmt)
    file_handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    for h in root.handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    return file_handler


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet: what creating it creates."""
    missing = None
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing, path = path, path.parent
    return missing


def resolve_spec(data_dir: Path, config: str | None, overrides: list[str]) -> DaemonSpec:
    path = config or (data_dir / CONFIG_FILE if (data_dir / CONFIG_FILE).exists() else None)
    return load_daemon(path, overrides)


def run(data_dir: Path, spec: DaemonSpec, *, verbose: bool = False) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the exit code."""
    import uvicorn

    data_dir = Path(data_dir).expanduser().resolve()
    created = _first_missing(data_dir)  # removed again if this start fails before serving
    data_dir = prepare_dir(data_dir)
    # A start refused here leaves the directory: another daemon may have created it meanwhile and
    # hold it. Only a start that holds the lock removes what it created (below).
    lock_fd = lock_data_dir(data_dir)
    serving: dict[str, Any] = {"on": False, "server": None, "served": False}

    def early_exit(signum: int, _frame: Any) -> None:
        if not serving["on"]:  # still loading: stop right here
            raise SystemExit(128 + signum)
        if serving["server"] is not None:  # uvicorn's own handler is not installed yet (or any more)
            serving["server"].should_exit = True

    old = {s: signal.signal(s, early_exit) for s in (signal.SIGTERM, signal.SIGINT)}
    service = None
    log_file = None
    info = data_dir / INFO_FILE
    try:
        log_file = _setup_logging(data_dir, verbose)
        token = ensure_token(data_dir)
        sock = bind_socket(spec.host, spec.port)
        port = sock.getsockname()[1]
        t0 = time.perf_counter()
        from .api import create_app
        from .service import ClientService

        service = ClientService(spec, data_dir, lock_fd=lock_fd)
        app = create_app(service, token)
        log.info("ready in %.1fs: task %s, base model %s, personal adapter %s", time.perf_counter() - t0,
                 spec.task, service.engine.model_hash[:12],
                 f"v{service.host.published.version}" if service.host.published else "none yet")
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=10,
                                lifespan="off", server_header=False)
        server = uvicorn.Server(config)
        atomic_write(info, json.dumps({"pid": os.getpid(), "url": f"http://{host}:{port}", "port": port,
                                       "host": spec.host, "started": time.time(), "task": spec.task}), mode=0o600)
        service.start()
        serving["server"], serving["on"], serving["served"] = server, True, True
        print(f"oppu client daemon: serving {spec.task} for {data_dir} on http://{host}:{port} (pid {os.getpid()})",
              file=sys.stderr, flush=True)
        if service.base.job_id:
            print(f"oppu client daemon: no base adapter for {spec.task} on this machine yet: training it now (job "
                  f"{service.base.job_id}; `oppu client status` shows its progress, `oppu client ask` waits for it)",
                  file=sys.stderr, flush=True)
        elif service.base.untrained_why:
            print(f"oppu client daemon: WARNING: the base adapter is untrained: {service.base.untrained_why}",
                  file=sys.stderr, flush=True)
        server.run(sockets=[sock])
        log.info("shutting down")
        return 0
    finally:
        serving["on"] = True  # a signal during cleanup must not interrupt it
        try:
            if service is not None:
                service.close()
        finally:
            info.unlink(missing_ok=True)
            log.info("stopped")
            if log_file is not None:
                logging.getLogger().removeHandler(log_file)
                log_file.close()
            if created is not None and not serving["served"]:
                # This start made the directory and never served from it: nothing of the user's is
                # in it (a token, a lock, a log of the failure), so it goes, with the lock still held.
                try:
                    shutil.rmtree(created)
                except OSError as e:
                    log.warning("could not remove %s, created by this failed start: %s", created, e)
            release_lock(lock_fd)
            for s, h in old.items():
                signal.signal(s, h)
