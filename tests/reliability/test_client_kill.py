"""A client killed mid-round in a real deployment: a SuperLink, three SuperNodes (one per user),
`flwr run`; once the first round is under way, one SuperNode and its ClientApp processes get
SIGKILL, and the SuperNode is started again. The run completes; the round the client missed
aggregates the others; the user's data directory is intact (history, adapters loadable).
Slow: ~3-6 min on 2 cores. Every process is stopped by its process group."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "coordinator"))
sys.path.insert(0, str(TESTS))

import fedkit  # noqa: E402
from test_deployment import BIN, ROOT, _free_port, _stop, _wait_for_port  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None, reason="flwr is not installed")]

HEX = re.compile(r"^[0-9a-f]{64}$")


def test_client_killed_mid_round_in_a_deployment(tmp_path, tiny_model_dir, figures):
    from client.personal import PersonalAdapters
    from client.userdir import UserDir

    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "federation.rounds=2", "data.users=3", "federation.min_clients=2",
                            "privacy.federate_base_adapter=true", 'methods=["OPPU"]', "federation.round_timeout=90")
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
        proc = subprocess.Popen(argv, env={**env, "FLWR_HOME": str(home)}, cwd=tmp_path, stdout=open(log, "a"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc, log

    def supernode(i: int) -> subprocess.Popen:
        node_config = f"data-dir='{run / 'users' / names[i]}' cache-dir='{tmp_path / f'cache-{i}'}'"
        return start(f"supernode-{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                        f"127.0.0.1:{link_port}", "--port", str(_free_port()),
                                        "--node-config", node_config], tmp_path / f"node-{i}-home")[0]

    victim_dir = run / "users" / names[0]
    history_before = (victim_dir / "history.json").read_bytes() if (victim_dir / "history.json").exists() else None
    try:
        link, link_log = start("superlink", [str(BIN / "flower-superlink"), "--insecure",
                                             "--disable-runtime-dependency-installation",
                                             "--host", "127.0.0.1", "--port", str(link_port)], tmp_path / "link-home")
        _wait_for_port(link_port, link, link_log)
        nodes = [supernode(i) for i in range(3)]
        cli_home = tmp_path / "cli-home"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n'
            "insecure = true\n")
        cli = subprocess.Popen([str(BIN / "flwr"), "run", str(ROOT), "loopback", "--run-config", str(overrides),
                                "--stream"], env={**env, "FLWR_HOME": str(cli_home)}, cwd=tmp_path,
                               stdout=open(tmp_path / "flwr-run.log", "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
        procs.append(cli)
        # Round 1 begins once the victim holds both artifacts (model, base adapter): kill it then.
        cache = tmp_path / "cache-0"
        deadline = time.time() + 400
        while time.time() < deadline:
            held = [p for p in cache.iterdir() if HEX.match(p.name)] if cache.is_dir() else []
            if len(held) >= 2:
                break
            assert cli.poll() is None, (tmp_path / "flwr-run.log").read_text()[-3000:]
            time.sleep(0.2)
        else:
            raise AssertionError("the victim never received the artifacts")
        time.sleep(1.5)
        os.killpg(nodes[0].pid, signal.SIGKILL)  # the SuperNode and the ClientApp it is running
        nodes[0].wait(10)
        time.sleep(3)
        supernode(0)  # the user's machine comes back
        cli.wait(timeout=900)
        summary_file = run / "federation.json"
        deadline = time.time() + 60
        while not summary_file.exists() and time.time() < deadline:
            time.sleep(0.5)
        logs = (tmp_path / "flwr-run.log").read_text()[-4000:]
        assert cli.returncode == 0 and summary_file.exists(), logs
    finally:
        for proc in reversed(procs):
            _stop(proc)
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [1, 2], summary
    r1 = summary["rounds"][0]
    missed = {**r1.get("failed", {}), **r1.get("rejected", {})}
    assert r1["aggregated"] >= 1 and missed, r1
    if history_before is not None:
        assert (victim_dir / "history.json").read_bytes() == history_before
    published, problems = PersonalAdapters(UserDir(victim_dir).personal_root("plain")).resolve()
    assert not [p for p in problems if "sha256" in p], problems
    assert published is not None  # it rejoined in round 2 and published its adapter atomically
    figures.fault("client killed mid-round (real deployment)", how="SIGKILL to one of 3 SuperNodes and its "
                  "ClientApp 1.5 s after it held the round's artifacts, restarted 3 s later",
                  survived=True, acknowledged=0, lost=0, adapter_ok=True,
                  note=f"(round 1: {r1['aggregated']} aggregated, missed: {sorted(missed)}; round 2: "
                  f"{summary['rounds'][1]['aggregated']} aggregated)")
