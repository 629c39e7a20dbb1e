"""Secure aggregation through Flower's SecAgg+ workflow: the coordinator only learns the average
of the users' base-adapter updates, which equals plain FedAvg's up to SecAgg+'s quantization."""

import numpy as np
import pytest
from safetensors.numpy import load_file

import inprocess_federation as fedkit

COMMON = ["federation.rounds=1", 'methods=["non-personalized"]', "privacy.federate_base_adapter=true",
          "federation.local_train.lr=0.01", "federation.personal_refresh_epochs=0"]


def _final(run):
    return load_file(str(run / "base_adapter" / "adapter_model.safetensors"))


def test_secagg_average_matches_fedavg(tmp_path, tiny_model_dir):
    results = {}
    for name, extra in (("plain", []), ("secagg", ["federation.secagg=true"])):
        run = tmp_path / name
        spec = fedkit.tiny_spec(tiny_model_dir, run, *COMMON, *extra)
        _, names = fedkit.prepare(spec, run)
        grid = fedkit.local_grid(spec, run, names)
        summary = fedkit.run(spec, run, grid)
        assert summary["rounds"][0]["aggregated"] == 3, summary["rounds"][0]
        results[name] = (_final(run), grid)
    plain, secure = results["plain"][0], results["secagg"][0]
    init = load_file(str(tmp_path / "plain" / "artifacts" / "base-adapter-init" / "adapter_model.safetensors"))
    moved = max(float(np.abs(plain[k] - init[k]).max()) for k in plain)
    assert moved > 1e-3  # training did change the adapter
    assert max(float(np.abs(plain[k] - secure[k]).max()) for k in plain) < 1e-4
    # No train reply of the SecAgg+ run carries the update in the clear.
    grid = results["secagg"][1]
    update_bytes = [v.tobytes() for k, v in secure.items() if "lora_B" in k]
    for _, kind, wire in grid.outbox:
        if kind == "train":
            assert not any(b in wire for b in update_bytes)


def test_secagg_with_dp_adds_noise_and_accounts(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, *COMMON, "federation.secagg=true",
                            "privacy.noise_multiplier=1.0", "privacy.clipping_norm=0.1")
    _, names = fedkit.prepare(spec, run)
    summary = fedkit.run(spec, run, fedkit.local_grid(spec, run, names))
    r = summary["rounds"][0]
    assert r["aggregated"] == 3 and r["epsilon"] == pytest.approx(summary["epsilon"]) and r["epsilon"] > 0
