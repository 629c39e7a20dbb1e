"""Helpers for the tests that run Flower's deployment engine for real, on loopback: a
`flower-superlink`, one `flower-supernode` per user's data directory (node config `data-dir`),
then `flwr run` of this app. Every process is started in its own session and stopped by its
process group (the ClientApp / ServerApp processes Flower spawns go with it). Offline:
telemetry and update checks are off, and nothing is installed at run time
(--disable-runtime-dependency-installation on the SuperLink; SuperNodes install nothing unless
told to)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
    try:  # children it spawned (flwr-serverapp, flwr-clientapp, superexec) share its group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on {port}: {log.read_text()[-3000:]}")


class Deployment:
    """`with Deployment(tmp, spec, run_dir, names) as d:` a SuperLink is listening; start the
    users' SuperNodes with `d.supernode(i)` and the run with `d.flwr_run()`. Leaving the block
    stops every process, newest first. Logs: tmp/<name>.log; user i's cache: tmp/cache-i."""

    def __init__(self, tmp: Path, spec: Any, run_dir: Path, names: list[str]) -> None:
        from shared.config import to_run_config

        self.tmp, self.run_dir, self.names = tmp, run_dir, names
        self.run_config = tmp / "run-config.toml"
        self.run_config.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in to_run_config(spec).items()))
        self.env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Deployment:
        try:
            link, log = self.start("superlink", [str(BIN / "flower-superlink"), "--insecure",
                                                 "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                                 "--port", str(self.port)], self.tmp / "link-home")
            wait_for_port(self.port, link, log)
            self.cli_home = self.tmp / "cli-home"
            self.cli_home.mkdir()
            (self.cli_home / "config.toml").write_text(
                f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
                "insecure = true\n")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            stop(proc)

    def start(self, name: str, argv: list[str], home: Path) -> tuple[subprocess.Popen, Path]:
        home.mkdir(parents=True, exist_ok=True)
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen(argv, env={**self.env, "FLWR_HOME": str(home)}, cwd=self.tmp, stdout=open(log, "a"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def supernode(self, i: int) -> subprocess.Popen:
        """User i's machine: a SuperNode bound to their data directory and their own cache."""
        node_config = f"data-dir='{self.run_dir / 'users' / self.names[i]}' cache-dir='{self.tmp / f'cache-{i}'}'"
        return self.start(f"supernode-{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                             f"127.0.0.1:{self.port}", "--port", str(free_port()),
                                             "--node-config", node_config], self.tmp / f"node-{i}-home")[0]

    def flwr_run(self) -> subprocess.Popen:
        """`flwr run` of this app with the run's config; output in tmp/flwr-run.log."""
        proc = subprocess.Popen([str(BIN / "flwr"), "run", str(ROOT), "loopback", "--run-config", str(self.run_config),
                                 "--stream"], env={**self.env, "FLWR_HOME": str(self.cli_home)}, cwd=self.tmp,
                                stdout=open(self.tmp / "flwr-run.log", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str, chars: int = 3000) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def summary(self, timeout: float = 60) -> dict[str, Any]:
        """The coordinator's federation.json, once the ServerApp has written it."""
        path = self.run_dir / "federation.json"
        wait_for(path.exists, timeout, lambda: f"{path}: " + self.log("flwr-run", 4000) + self.log("superlink"),
                 every=0.5)
        return json.loads(path.read_text())
