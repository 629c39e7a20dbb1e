"""A client killed mid-round in a real deployment: a SuperLink, three SuperNodes (one per user),
`flwr run`; once the first round is under way, one SuperNode and its ClientApp processes get
SIGKILL, and the SuperNode is started again. The run completes; the round the client missed
aggregates the others; the user's data directory is intact (history, adapters loadable).
Slow: ~3-6 min on 2 cores. Every process is stopped by its process group."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

import pytest

import inprocess_federation as fedkit
from flower_deployment import BIN, Deployment

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
    victim_dir = run / "users" / names[0]
    history_before = (victim_dir / "history.json").read_bytes() if (victim_dir / "history.json").exists() else None
    with Deployment(tmp_path, spec, run, names) as d:
        nodes = [d.supernode(i) for i in range(3)]
        cli = d.flwr_run()
        # Round 1 begins once the victim holds both artifacts (model, base adapter): kill it then.
        cache = tmp_path / "cache-0"
        deadline = time.time() + 400
        while time.time() < deadline:
            held = [p for p in cache.iterdir() if HEX.match(p.name)] if cache.is_dir() else []
            if len(held) >= 2:
                break
            assert cli.poll() is None, d.log("flwr-run")
            time.sleep(0.2)
        else:
            raise AssertionError("the victim never received the artifacts")
        time.sleep(1.5)
        os.killpg(nodes[0].pid, signal.SIGKILL)  # the SuperNode and the ClientApp it is running
        nodes[0].wait(10)
        time.sleep(3)
        d.supernode(0)  # the user's machine comes back
        cli.wait(timeout=900)
        assert cli.returncode == 0, d.log("flwr-run", 4000)
        summary = d.summary()
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
