"""`oppu simulate`: Flower's simulation engine (Ray backend) with virtual users, in one command,
reporting per-round base-adapter metrics and the final OPPU table."""

import json
import os
from pathlib import Path

import pytest

import inprocess_federation as fedkit


def test_oppu_simulate_runs_the_flower_simulation_engine(tmp_path, tiny_model_dir, capsys):
    from oppu.cli import main

    run = tmp_path / "run"
    args = ["simulate", "--model", str(tiny_model_dir), "--users", "3", "--rounds", "2", "--run-dir", str(run),
            "--methods", "non-personalized,OPPU,OPPU+RAG"]
    # Every user trains every round (the default simulation samples half of them).
    # One virtual client at a time on any machine (sim_client_cpus = its cores): one worker, so the
    # three users form one cohort (coordinator/cohorts.py).
    for ov in fedkit.BASE_OVERRIDES + ["privacy.federate_base_adapter=true", "federation.evaluate_every=1",
                                       "federation.fraction_train=1.0", f"federation.sim_client_cpus={os.cpu_count()}",
                                       f'federation.client_cache="{tmp_path / "cache"}"']:
        if not ov.startswith(("methods", "data.users", "federation.rounds")):
            args += ["--set", ov]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "federation.json").read_text())
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["replied"] == 3 and r["aggregated"] == 3 for r in summary["rounds"])
    # One worker trained the three users' personal adapters each round (coordinator/cohorts.py:
    # personal_train.users_per_pass = 4 holds them all), through Flower's simulation engine.
    assert all(r["personal"]["cohorts"] == 1 and r["personal"]["users"] == 3 for r in summary["rounds"]), \
        [r.get("personal") for r in summary["rounds"]]
    assert "non-personalized/accuracy" in summary["rounds"][0]["evaluate"]
    # The coordinator's per-round table and the OPPU table scored from the users' own predictions.
    assert "base adapter (non-personalized)" in out and "OPPU+RAG" in out and "Δaccuracy vs non-pers." in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["aggregate"]) == {"non-personalized", "OPPU", "OPPU+RAG"}
    assert metrics["federation"]["rounds"] == 2
    # each client's adoption decision, counted as `oppu experiment` counts it ("adopted: 1/3")
    for m, aug in (("OPPU", "plain"), ("OPPU+RAG", "rag")):
        decided = [json.loads(f.read_text())["adopted"] for f in (run / "users").glob(f"*/federation/selection-{aug}.json")]
        assert metrics["adoption"][m] == {"adopted": sum(decided), "users": 3}, m
    # The run directory a researcher reads: tables, plots, privacy spent, the one-page report.
    for name in ("metrics.md", "privacy.json", "plots/methods.png", "plots/rounds.png", "REPORT.md", "run.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "privacy.json").read_text())["user_level"]["rounds_accounted"] == 2


def test_ray_backend_joins_a_cluster_or_starts_one_and_asks_per_client_resources():
    from shared.config import FederationSpec
    from simulations.simulate import ray_backend

    local = ray_backend(FederationSpec(sim_client_cpus=0.5), verbose=False)
    assert local["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert local["init_args"]["address"] == "local" and local["init_args"]["num_cpus"] >= 1
    joined = ray_backend(FederationSpec(ray_address="10.0.0.5:6379", sim_client_gpus=0.25), verbose=False)
    # a cluster's nodes bring their own cores: a num_cpus here would make Ray refuse to connect
    assert joined["init_args"]["address"] == "10.0.0.5:6379" and "num_cpus" not in joined["init_args"]
    assert joined["client_resources"]["num_gpus"] == 0.25
    with pytest.raises(ValueError, match="ray://"):
        FederationSpec(ray_address="ray://head:10001")
    with pytest.raises(ValueError, match="sim_client_gpus"):
        FederationSpec(sim_client_gpus=-1)


@pytest.mark.slow  # starts a two-node Ray cluster and a federation on it
def test_simulate_runs_on_a_multi_node_ray_cluster(tmp_path, tiny_model_dir, capsys):
    """A head node with no CPUs for tasks and a worker node with two: every virtual client can only
    run on the worker node, so a completed round means the run used the cluster's other node."""
    from ray.cluster_utils import Cluster

    from oppu.cli import main

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        run = tmp_path / "run"
        args = ["simulate", "--model", str(tiny_model_dir), "--users", "2", "--rounds", "1", "--run-dir", str(run),
                "--methods", "non-personalized,OPPU", "--set", f'federation.ray_address="{cluster.address}"']
        for ov in fedkit.BASE_OVERRIDES + ["federation.fraction_train=1.0", "federation.evaluate_every=1",
                                           f'federation.client_cache="{tmp_path / "cache"}"']:
            if not ov.startswith(("methods", "data.users", "federation.rounds")):
                args += ["--set", ov]
        assert main(args) == 0
        summary = json.loads((run / "federation.json").read_text())
        assert summary["status"] == "completed"
        assert summary["rounds"][0]["replied"] == 2 and summary["rounds"][0]["aggregated"] == 2
        assert (run / "metrics.json").is_file()
        # The clients' actors ran in this cluster's session (a run that ignored ray_address
        # would have started a Ray of its own, with its own session and logs).
        logs = Path(cluster.head_node.get_session_dir_path()) / "logs"
        assert any("ClientAppActor" in p.read_text(errors="ignore") for p in logs.glob("worker-*.out"))
    finally:
        cluster.shutdown()
