"""The deployment engine on loopback: one `flower-superlink`, two `flower-supernode` processes
each bound to one user's data directory (node config `data-dir`), then `flwr run` of this app.
Every process the test starts is stopped by its PID (and its process group, for the ClientApp /
ServerApp processes they spawn). Offline: telemetry and update checks are off, and nothing is
installed at run time (--disable-runtime-dependency-installation on the SuperLink; SuperNodes
install nothing unless told to)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fedkit

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
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


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on {port}: {log.read_text()[-3000:]}")


@pytest.mark.slow  # ~1.5-3 min on 2 cores: every message starts a ClientApp process
@pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None, reason="flwr is not installed")
def test_superlink_and_two_supernodes_run_a_federated_round(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "federation.rounds=2", "data.users=2",
                            "privacy.federate_base_adapter=true", 'methods=["non-personalized", "OPPU"]')
    _, names = fedkit.prepare(spec, run)
    from shared.config import to_run_config

    overrides = tmp_path / "run-config.toml"
    overrides.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in to_run_config(spec).items()))

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    link_port = _free_port()
    procs: list[subprocess.Popen] = []

    def start(name: str, argv: list[str], home: Path) -> tuple[subprocess.Popen, Path]:
        home.mkdir(parents=True, exist_ok=True)
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen(argv, env={**env, "FLWR_HOME": str(home)}, cwd=tmp_path, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc, log

    try:
        link, link_log = start("superlink", [str(BIN / "flower-superlink"), "--insecure",
                                             "--disable-runtime-dependency-installation",
                                             "--host", "127.0.0.1", "--port", str(link_port)], tmp_path / "link-home")
        _wait_for_port(link_port, link, link_log)
        for i, name in enumerate(names):
            node_config = f"data-dir='{run / 'users' / name}' cache-dir='{tmp_path / f'cache-{i}'}'"
            start(f"supernode-{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                     f"127.0.0.1:{link_port}", "--port", str(_free_port()),
                                     "--node-config", node_config], tmp_path / f"node-{i}-home")
        cli_home = tmp_path / "cli-home"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n'
            "insecure = true\n")
        t0 = time.time()
        cli = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "loopback", "--run-config", str(overrides),
                              "--stream"], env={**env, "FLWR_HOME": str(cli_home)}, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        seconds = time.time() - t0
        logs = cli.stdout[-4000:] + cli.stderr[-2000:]
        assert cli.returncode == 0, logs
        summary_file = run / "federation.json"
        deadline = time.time() + 60
        while not summary_file.exists() and time.time() < deadline:
            time.sleep(0.5)
        assert summary_file.exists(), logs + (tmp_path / "superlink.log").read_text()[-3000:]
    finally:
        for proc in reversed(procs):
            _stop(proc)

    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["aggregated"] == 2 and not r["rejected"] for r in summary["rounds"])
    assert summary["final"]["users"] == 2 and "OPPU/accuracy" in summary["final"]
    # Each machine received the model once, into its own cache, and keeps its adapter at home.
    assert summary["rounds"][0]["bytes_per_client"]["artifacts"] > 1e6
    assert summary["rounds"][1]["bytes_per_client"]["artifacts"] == 0
    for i, name in enumerate(names):
        assert len(list((tmp_path / f"cache-{i}").iterdir())) >= 2
        d = run / "users" / name
        assert (d / "personal-plain" / "CURRENT").exists()
        assert json.loads((d / "federation.json").read_text())["rounds"] == 2
    assert all(p.poll() is not None for p in procs)
    print(f"loopback deployment: 2 supernodes x 2 rounds in {seconds:.0f} s")
