"""What a run says about its epsilon: privacy.json and REPORT.md's privacy line name the
mechanism and the accountant, give the RDP figure beside the reported one, say that simulated
users report their numbers, and, when participation was seeded for reproducibility, that the
epsilon assumes the seed is secret."""

import json

import pytest

from shared.config import load_federated
from shared.privacy import PrivacyEvent

SEEDED = "sampling seeded for reproducibility: the epsilon assumes the seed is secret"
DP = ["privacy.federate_base_adapter=true", "privacy.noise_multiplier=0.8", "privacy.clipping_norm=0.05",
      "privacy.delta=1e-3", "federation.fraction_train=0.3333"]


def _privacy(tmp_path, *overrides):
    from coordinator.report import privacy_summary
    from coordinator.strategy import Accounting
    from simulations.simulate import privacy_spent

    spec = load_federated(None, [*DP, *overrides])
    ledger = Accounting(spec)
    rounds = []
    for rnd in (1, 2):
        ledger.record(PrivacyEvent(0.8, 0.3333, 1))
        rounds.append({"round": rnd, "aggregated": 1, "sample_rate": 0.3333, "epsilon": ledger.epsilon()})
    summary = {"rounds": rounds, "epsilon": ledger.epsilon(), "privacy": privacy_summary(spec, ledger)}
    (tmp_path / "users").mkdir(exist_ok=True)
    privacy = privacy_spent(spec, summary, tmp_path)
    return json.loads(json.dumps(privacy)), summary


def test_a_seeded_simulation_says_the_epsilon_assumes_the_seed_is_secret(tmp_path):
    from simulations.reports.run_outputs import privacy_line

    privacy, summary = _privacy(tmp_path, "federation.sampling_seed=0")
    u = privacy["user_level"]
    assert u["note"] == SEEDED and u["sampling_seeded"] is True
    assert u["epsilon"] == pytest.approx(3.48, abs=0.01) and u["epsilon_rdp"] == pytest.approx(4.26, abs=0.01)
    assert u["rounds_accounted"] == 2 and "Poisson" in u["sampling"]
    line = privacy_line(privacy)
    assert SEEDED in line and "RDP alone: 4.26" in line and "simulated users" in line


def test_secret_sampling_carries_no_such_note(tmp_path):
    from simulations.reports.run_outputs import privacy_line

    privacy, _ = _privacy(tmp_path)
    u = privacy["user_level"]
    assert "note" not in u and u["sampling_seeded"] is False and "CSPRNG" in u["sampling"]
    assert "seed" not in privacy_line(privacy)
