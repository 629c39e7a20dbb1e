"""`oppu simulate`: Flower's simulation engine (Ray backend) with virtual users, in one command,
reporting per-round base-adapter metrics and the final OPPU table."""

import json

import inprocess_federation as fedkit


def test_oppu_simulate_runs_the_flower_simulation_engine(tmp_path, tiny_model_dir, capsys):
    from oppu.cli import main

    run = tmp_path / "run"
    args = ["simulate", "--model", str(tiny_model_dir), "--users", "3", "--rounds", "2", "--run-dir", str(run),
            "--methods", "non-personalized,OPPU,OPPU+RAG"]
    # Every user trains every round (the default simulation samples half of them).
    for ov in fedkit.BASE_OVERRIDES + ["privacy.federate_base_adapter=true", "federation.evaluate_every=1",
                                       "federation.fraction_train=1.0",
                                       f'federation.client_cache="{tmp_path / "cache"}"']:
        if not ov.startswith(("methods", "data.users", "federation.rounds")):
            args += ["--set", ov]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "federation.json").read_text())
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["replied"] == 3 and r["aggregated"] == 3 for r in summary["rounds"])
    assert "non-personalized/accuracy" in summary["rounds"][0]["evaluate"]
    # The coordinator's per-round table and the OPPU table scored from the users' own predictions.
    assert "base adapter (non-personalized)" in out and "OPPU+RAG" in out and "Δaccuracy vs non-pers." in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["aggregate"]) == {"non-personalized", "OPPU", "OPPU+RAG"}
    assert metrics["federation"]["rounds"] == 2
    # The run directory a researcher reads: tables, plots, privacy spent, the one-page report.
    for name in ("metrics.md", "privacy.json", "plots/methods.png", "plots/rounds.png", "REPORT.md", "run.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "privacy.json").read_text())["user_level"]["rounds_accounted"] == 2
