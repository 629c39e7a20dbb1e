"""shared/privacy.py: accounting of the Poisson-subsampled Gaussian mechanism checked against
independent implementations (Google's dp-accounting RDP and PLD accountants, Opacus's RDP), the
reported epsilon (the smaller of RDP and PRV) and the budget stop on that same number, state that
survives save/load, keyword-only privacy parameters, clipping."""

import json
import math

import numpy as np
import pytest

from shared.aggregation import Mechanism
from shared.privacy import Accountant, RDPAccountant, clip_update, l2_norm, rdp_sampled_gaussian


def test_epsilon_matches_opacus_and_grows_with_rounds():
    from opacus.accountants import RDPAccountant as OpacusRDP

    ours, theirs, eps = RDPAccountant(), OpacusRDP(), []
    for _ in range(3):
        ours.step(noise_multiplier=1.1, sample_rate=0.5)
        theirs.step(noise_multiplier=1.1, sample_rate=0.5)
        eps.append(ours.epsilon(delta=1e-5))
    assert eps == sorted(eps) and eps[0] > 0
    # Same maths (our order grid is a superset of Opacus's, so ours is at least as tight).
    assert eps[-1] <= theirs.get_epsilon(delta=1e-5) + 1e-9
    assert eps[-1] == pytest.approx(theirs.get_epsilon(delta=1e-5), rel=0.05)


# (z, q, steps, delta): the default simulate config (0.8, 2 of 6 users, 2 rounds, 1e-3), a
# cross-device scale (q=0.001, 10,000 rounds), full participation, and a few in between.
REFERENCE_EVENTS = [(0.8, 1 / 3, 2, 1e-3), (1.1, 0.001, 10_000, 1e-5), (2.0, 1.0, 3, 1e-5),
                    (1.0, 0.01, 1000, 1e-5), (5.0, 0.1, 50, 1e-6), (0.6, 0.05, 200, 1e-5)]


def _dp_accounting(z, q, steps, delta):
    """(RDP, PLD) epsilons from Google's dp-accounting (a test-only dependency: an independent
    implementation of both analyses)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event, steps)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(event, steps)
    return rdp.get_epsilon(delta), pld.get_epsilon(delta)


@pytest.mark.parametrize("z, q, steps, delta", REFERENCE_EVENTS)
def test_accountant_matches_independent_references(z, q, steps, delta):
    from opacus.accountants import RDPAccountant as OpacusRDP

    ref_rdp, ref_pld = _dp_accounting(z, q, steps, delta)
    opacus = OpacusRDP()
    opacus.history = [(z, q, steps)]
    ours = Accountant()
    ours.step(noise_multiplier=z, sample_rate=q, steps=steps)
    report = ours.report(delta=delta)
    # RDP: the same number as dp-accounting's and Opacus's RDP accountants (to the third decimal).
    assert report["epsilon_rdp"] == pytest.approx(ref_rdp, abs=1e-3)
    assert report["epsilon_rdp"] == pytest.approx(opacus.get_epsilon(delta=delta), abs=1e-3)
    # PRV: an upper bound that dp-accounting's PLD (another tight accountant, pessimistic
    # discretization) confirms: never below it, at most its 0.01 error interval above.
    assert ref_pld - 1e-6 <= report["epsilon_prv"] <= ref_pld + 0.02
    # Reported: the tighter of the two, here the PRV one, well below RDP.
    assert report["epsilon"] == ours.epsilon(delta=delta) == min(report["epsilon_rdp"], report["epsilon_prv"])
    assert report["epsilon"] < report["epsilon_rdp"]


def test_tiny_noise_is_accounted_by_rdp_without_exhausting_memory():
    """z = 0.003 (a cell of the default privacy ablation): the PRV discretization would not fit in
    memory; above epsilon 64 the report is RDP's, and says the PRV figure is missing."""
    a = Accountant()
    a.step(noise_multiplier=0.003, sample_rate=0.5, steps=2)
    r = a.report(delta=1e-3)
    assert r["epsilon_prv"] is None and r["epsilon"] == r["epsilon_rdp"] > 1e5
    assert json.loads(json.dumps(r)) == r  # plain JSON (no Infinity) for privacy.json


def test_the_figures_quoted_for_the_default_simulate_config():
    """z=0.8, q=1/3 (2 of 6 users expected), 2 rounds, delta=1e-3: RDP 4.26, the tight accountants 3.47."""
    a = Accountant()
    a.step(noise_multiplier=0.8, sample_rate=1 / 3, steps=2)
    r = a.report(delta=1e-3)
    assert round(r["epsilon_rdp"], 2) == 4.26 and r["epsilon"] == pytest.approx(3.47, abs=0.015)


def test_the_budget_stop_uses_the_reported_epsilon():
    """After one round at (0.8, 1/3), a second would reach 3.48 (PRV) or 4.26 (RDP): a budget of 4
    lets it run, because the reported epsilon is the one that must stay within the budget."""
    from coordinator.strategy import Accounting
    from shared.config import load_federated
    from shared.privacy import PrivacyEvent

    spec = load_federated(None, ["privacy.federate_base_adapter=true", "privacy.noise_multiplier=0.8",
                                 "privacy.delta=1e-3", "privacy.epsilon_budget=4.0", "federation.fraction_train=0.3333"])
    ledger = Accounting(spec)
    ledger.record(PrivacyEvent(0.8, 1 / 3, 1))
    assert not ledger.would_exceed(sample_rate=1 / 3) and ledger.projected(sample_rate=1 / 3) == pytest.approx(3.48, abs=0.01)
    rdp_only = RDPAccountant.from_state_dict(ledger.state_dict())
    assert rdp_only.would_exceed(budget=4.0, delta=1e-3, noise_multiplier=0.8, sample_rate=1 / 3)
    ledger.record(PrivacyEvent(0.8, 1 / 3, 1))
    assert ledger.epsilon() <= 4.0 and ledger.would_exceed(sample_rate=1 / 3)  # a third round would not fit
    assert Accountant.from_state_dict(json.loads(json.dumps(ledger.state_dict()))).epsilon(delta=1e-3) == ledger.epsilon()


def test_sampling_amplifies_and_more_noise_helps():
    def eps(z, q):
        a = RDPAccountant()
        a.step(noise_multiplier=z, sample_rate=q, steps=5)
        return a.epsilon(delta=1e-5)

    assert eps(1.0, 0.1) < eps(1.0, 1.0)
    assert eps(2.0, 0.5) < eps(1.0, 0.5)
    assert math.isinf(eps(0.0, 0.5))


def test_state_dict_round_trips_through_json():
    a = RDPAccountant()
    a.step(noise_multiplier=1.0, sample_rate=0.25)
    a.step(noise_multiplier=1.0, sample_rate=0.25)
    a.step(noise_multiplier=0.75, sample_rate=0.25)  # a round with a dropped client
    b = RDPAccountant.from_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b == a and b.steps == 3
    assert b.epsilon(delta=1e-5) == a.epsilon(delta=1e-5)
    with pytest.raises(ValueError, match="not sampled-gaussian"):
        RDPAccountant.from_state_dict({"mechanism": "laplace", "orders": [2], "history": []})


def test_budget_projection_does_not_change_the_state():
    a = RDPAccountant()
    a.step(noise_multiplier=1.0, sample_rate=0.5)
    before = a.state_dict()
    after = a.epsilon_after(delta=1e-5, noise_multiplier=1.0, sample_rate=0.5)
    assert a.state_dict() == before and after > a.epsilon(delta=1e-5)
    assert a.would_exceed(budget=after - 1e-6, delta=1e-5, noise_multiplier=1.0, sample_rate=0.5)
    assert not a.would_exceed(budget=after + 1e-6, delta=1e-5, noise_multiplier=1.0, sample_rate=0.5)
    assert not a.would_exceed(budget=0, delta=1e-5, noise_multiplier=1.0, sample_rate=0.5)  # 0 = no budget


def test_privacy_parameters_are_keyword_only_and_checked():
    a = RDPAccountant()
    with pytest.raises(TypeError):
        a.step(1.0, 0.5)  # type: ignore[misc]
    with pytest.raises(TypeError):
        rdp_sampled_gaussian(1.0, 0.5, 1)  # type: ignore[misc]
    with pytest.raises(ValueError, match="sample_rate"):
        a.step(noise_multiplier=1.0, sample_rate=1.5)
    with pytest.raises(ValueError, match="noise_multiplier"):
        a.step(noise_multiplier=-1.0, sample_rate=0.5)


def test_clipping_bounds_the_update_not_the_weights():
    old = {"a": np.ones(4, dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
    new = {"a": old["a"] + 3.0, "b": np.full(3, 4.0, dtype=np.float32)}
    clipped, norm = clip_update(new, old, clipping_norm=1.0)
    delta = {k: clipped[k] - old[k] for k in old}
    assert norm == pytest.approx(math.sqrt(4 * 9 + 3 * 16))
    assert l2_norm(delta) == pytest.approx(1.0, rel=1e-5)
    small = {"a": old["a"] + 0.1, "b": old["b"]}
    assert np.allclose(clip_update(small, old, clipping_norm=1.0)[0]["a"], small["a"])
    # DP-FedAvg's noise on the average: z·C/(q·N), q·N the expected participants (here 4).
    assert Mechanism(noise_multiplier=1.0, clipping_norm=0.5, sample_rate=0.5).noise_std(8) == pytest.approx(0.125)


def test_record_level_dp_sgd_in_the_training_loop(tiny_engine):
    """Opacus DP-SGD through THE training loop: Poisson batches (some empty), per-example clipping
    and noise; the run is accounted as steps x sampled Gaussian with q = batch / n."""
    import torch

    from shared.config import TrainSpec
    from shared.dpsgd import DPSGD
    from shared.training import Example

    examples = [Example(f"Tag this movie: a space opera {i}", "sci-fi") for i in range(24)]
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=0.5, expected_batch_size=1, seed=3)
    before = {k: v.clone() for k, v in tiny_engine.personal_state().items()}
    r = tiny_engine.train_personal(examples, TrainSpec(epochs=1, lr=1e-2, batch_size=1), progress=False, dp_sgd=dp)
    assert dp.sample_rate == pytest.approx(1 / 24) and dp.steps == 24 and r.steps == 24
    assert len(r.losses) < r.steps  # empty Poisson batches happened and did not crash the optimizer
    after = tiny_engine.personal_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    acc = RDPAccountant()
    dp.account(acc)
    ref = RDPAccountant()
    ref.step(noise_multiplier=1.0, sample_rate=1 / 24, steps=24)
    assert acc == ref and 0 < acc.epsilon(delta=1e-5) < 10


def test_the_run_stops_cleanly_before_the_budget_is_exceeded(tmp_path, tiny_model_dir):
    """z=2, every user every round (q=1): the reported epsilon (the smaller of PRV and RDP) is
    2.00, 2.95, 3.72 after rounds 1-3 at delta=1e-5 (RDP alone: 2.17, 3.19, 4.01); with a budget
    of 3.5 the third round is never run, and the run still reports and evaluates."""
    import inprocess_federation as fedkit

    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "federation.rounds=4", "data.users=2", 'methods=["non-personalized"]',
                            "privacy.federate_base_adapter=true", "privacy.noise_multiplier=2.0",
                            "privacy.clipping_norm=0.5", "privacy.epsilon_budget=3.5",
                            "federation.report_client_metrics=true")
    _, names = fedkit.prepare(spec, run)
    summary = fedkit.run(spec, run, fedkit.local_grid(spec, run, names))
    assert summary["status"] == "budget-exhausted"
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert [round(r["epsilon"], 2) for r in summary["rounds"]] == [2.0, 2.95]
    assert [round(r["epsilon_rdp"], 2) for r in summary["rounds"]] == [2.17, 3.19]
    assert summary["epsilon"] <= 3.5 and summary["final"]["users"] == 2
    assert "budget-exhausted" in (run / "report.md").read_text()
