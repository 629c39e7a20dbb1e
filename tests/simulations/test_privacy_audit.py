"""`oppu audit privacy`: canary users through THE DP-FedAvg round give an empirical lower bound on
epsilon that stays below the accountant's for the real mechanism, and exceeds it when the
mechanism is deliberately broken (noise divided by 10), so the audit catches what a wrong
implementation would leak."""

import json
import math

import pytest

from shared import aggregation
from simulations.audit import AuditSpec, clopper_pearson_upper, epsilon_lower_bound, run_audit


def test_the_lower_bound_stays_below_the_accounted_epsilon():
    result = run_audit(AuditSpec())
    assert result["members"] + result["nonmembers"] == 1000 and min(result["members"], result["nonmembers"]) > 400
    assert 0 < result["epsilon_lower"] <= result["accounted_epsilon"], result
    assert result["accounted_epsilon"] == pytest.approx(2.56, abs=0.02) and result["consistent"]
    # The test does see the canary (better than chance), it just cannot see much.
    assert result["fpr"] + result["fnr"] < 1


def test_a_mechanism_with_a_tenth_of_the_noise_is_caught(monkeypatch):
    real = aggregation.Mechanism.noise_std
    monkeypatch.setattr(aggregation.Mechanism, "noise_std", lambda self, population: real(self, population) / 10)
    result = run_audit(AuditSpec())
    assert result["epsilon_lower"] > result["accounted_epsilon"] + 1.0, result
    assert not result["consistent"] and result["verdict"].startswith("VIOLATION")


def test_a_mechanism_that_trusts_the_clients_clipping_is_caught(monkeypatch):
    """A canary that sends 10 C: the coordinator's clipping keeps the audit consistent; without it
    (clipping left to the client, as a malicious one would) the canary is seen at once."""
    spec = AuditSpec(canary_scale=10.0)
    assert run_audit(spec)["consistent"]
    real = aggregation.clip
    monkeypatch.setattr(aggregation, "clip", lambda delta, *, bound: real(delta, bound=0))  # 0: no bound
    result = run_audit(spec)
    assert not result["consistent"] and result["epsilon_lower"] > result["accounted_epsilon"] + 1.0


def test_clopper_pearson_and_the_bound():
    assert clopper_pearson_upper(0, 100, alpha=0.025) == pytest.approx(1 - 0.025 ** (1 / 100))
    assert clopper_pearson_upper(5, 5, alpha=0.025) == 1.0
    chance = epsilon_lower_bound(false_positives=50, negatives=100, false_negatives=50, positives=100,
                                 delta=1e-5, confidence=0.95)
    assert chance["epsilon_lower"] == 0.0
    perfect = epsilon_lower_bound(false_positives=0, negatives=500, false_negatives=0, positives=500,
                                  delta=1e-5, confidence=0.95)
    assert perfect["epsilon_lower"] == pytest.approx(math.log((1 - 1e-5 - perfect["fnr_upper"]) / perfect["fpr_upper"]))
    assert 4.5 < perfect["epsilon_lower"] < math.log(500)


def test_oppu_audit_privacy_writes_its_report(tmp_path, capsys):
    from oppu.cli import main

    out = tmp_path / "audit"
    assert main(["audit", "privacy", "--trials", "200", "--out", str(out)]) == 0
    result = json.loads((out / "audit.json").read_text())
    assert result["settings"]["trials"] == 200 and result["consistent"]
    text = (out / "audit.md").read_text()
    assert "empirical lower bound" in text and "accounted epsilon" in text and "Verdict: consistent" in text
    assert "Verdict" in capsys.readouterr().out
