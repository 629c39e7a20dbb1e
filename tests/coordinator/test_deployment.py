"""The deployment engine on loopback (tests/flower_deployment.py): one `flower-superlink`, two
`flower-supernode` processes each bound to one user's data directory, then `flwr run` of this app;
a federated run completes with each machine's model in its own cache and adapters at home."""

import json
import shutil
import time

import pytest

import inprocess_federation as fedkit
from flower_deployment import BIN, Deployment


@pytest.mark.slow  # ~1.5-3 min on 2 cores: every message starts a ClientApp process
@pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None, reason="flwr is not installed")
def test_superlink_and_two_supernodes_run_a_federated_round(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "federation.rounds=2", "data.users=2",
                            "privacy.federate_base_adapter=true", 'methods=["non-personalized", "OPPU"]')
    _, names = fedkit.prepare(spec, run)
    with Deployment(tmp_path, spec, run, names) as d:
        for i in range(len(names)):
            d.supernode(i)
        t0 = time.time()
        cli = d.flwr_run()
        cli.wait(timeout=600)
        seconds = time.time() - t0
        assert cli.returncode == 0, d.log("flwr-run", 6000)
        summary = d.summary()
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["aggregated"] == 2 and not r["rejected"] for r in summary["rounds"])
    assert summary["final"]["users"] == 2 and "OPPU/accuracy" in summary["final"]
    # Each machine received the model once, into its own cache, and keeps its adapter at home.
    assert summary["rounds"][0]["bytes_per_client"]["artifacts"] > 1e6
    assert summary["rounds"][1]["bytes_per_client"]["artifacts"] == 0
    for i, name in enumerate(names):
        assert len(list((tmp_path / f"cache-{i}").iterdir())) >= 2
        home = run / "users" / name
        assert (home / "personal-plain" / "CURRENT").exists()
        assert json.loads((home / "federation.json").read_text())["rounds"] == 2
    assert all(p.poll() is not None for p in d.procs)
    print(f"loopback deployment: 2 supernodes x 2 rounds in {seconds:.0f} s")
