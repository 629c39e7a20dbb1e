"""THE DP-FedAvg round (shared/aggregation.py) is the one the coordinator runs and the one the
privacy ablation measures: the same updates and noise seed give bit-identical aggregates through
both; Poisson participation; the fixed denominator; server-side clipping; and, without DP, a
poisoned update and an inflated example count cannot drag the global adapter past the bound."""

import math

import numpy as np
import pytest

from shared.aggregation import (
    Mechanism, clipped_sum, dp_fedavg_round, noise_generator, norm, participants, release, robust_weights,
)
from shared.config import load_federated
from shared.privacy import PrivacyEvent

KEYS = ("m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight", "m.layers.0.v_proj.lora_B.weight")


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(4, 8) if "lora_A" in k else (8, 4)).astype(np.float32) for k in KEYS}


def _updates(state, scales, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for s in scales:
        d = {k: rng.normal(size=v.shape) for k, v in state.items()}
        n = norm(d)
        out.append({k: (state[k] + d[k] * s / n).astype(np.float32) for k in state})
    return out


def _replies(updates, counts=None):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    out = []
    for i, u in enumerate(updates):
        sent = Message(RecordDict(), dst_node_id=100 + i, message_type="train")
        metrics = {} if counts is None else {"num-examples": float(counts[i])}
        content = RecordDict({"metrics": MetricRecord(metrics),
                              "arrays": ArrayRecord({k: Array(np.ascontiguousarray(u[k])) for k in KEYS})})
        out.append(Message(content, reply_to=sent))
    return out


def test_coordinator_and_ablation_release_the_same_aggregate():
    from coordinator.strategy import aggregate_dp, screen
    from simulations.ablation import aggregate_round

    state = _state()
    updates = _updates(state, [0.2, 3.0, 0.45, 40.0])  # two above C = 0.5: the server clips them
    spec = load_federated(None, ["privacy.federate_base_adapter=true", "privacy.noise_multiplier=1.3",
                                 "privacy.clipping_norm=0.5", "federation.fraction_train=0.5"])
    population = 8  # q·N = 4 expected participants
    screened = screen(_replies(updates), {k: v.shape for k, v in state.items()}, federate=True, dp=True)
    assert len(screened.accepted) == 4, screened.rejected  # under DP no example count is needed
    coord = aggregate_dp(screened.accepted, state, spec, population=population, rng=noise_generator(7, 3))
    cell = {"noise_multiplier": 1.3, "clipping_norm": 0.5, "clients_per_round": 4, "population": population}
    abl = aggregate_round(state, updates, cell, population=population, rng=noise_generator(7, 3))
    for k in KEYS:
        assert coord.state[k].dtype == np.float32 and np.array_equal(coord.state[k], abl.state[k]), k
    assert coord.event == abl.event == PrivacyEvent(1.3, 0.5, 1)
    assert coord.clipped == abl.clipped == 2 and coord.contributions == 4

    # The maths, written out: clip each delta to C, sum, divide by q·N, add N(0, (z·C/(q·N))²).
    rng = noise_generator(7, 3)
    std = 1.3 * 0.5 / (0.5 * population)
    noise = {k: rng.normal(0.0, std, size=state[k].shape) for k in sorted(KEYS)}
    for k in KEYS:
        s = 0.0
        for u in updates:
            d = {j: u[j].astype(np.float64) - state[j] for j in KEYS}
            s = s + d[k] * min(1.0, 0.5 / norm(d))
        expected = (state[k].astype(np.float64) + s / (0.5 * population) + noise[k]).astype(np.float32)
        np.testing.assert_allclose(coord.state[k], expected, rtol=0, atol=1e-6)
    # Another seed, other noise; no seed, secret noise.
    other = aggregate_round(state, updates, cell, population=population, rng=noise_generator(8, 3))
    assert not np.array_equal(other.state[KEYS[0]], abl.state[KEYS[0]])


def test_the_denominator_is_fixed_and_the_secagg_release_is_the_same_round():
    state = _state()
    mech = Mechanism(noise_multiplier=0.0, clipping_norm=1.0, sample_rate=0.25)
    updates = _updates(state, [0.5]) * 4  # four users sending the same update of norm 0.5
    full = dp_fedavg_round(state, updates, mechanism=mech, population=16, rng=noise_generator(0))
    dropped = dp_fedavg_round(state, updates[:2], mechanism=mech, population=16, rng=noise_generator(0))
    moved = lambda r: norm({k: r.state[k].astype(np.float64) - state[k] for k in KEYS})  # noqa: E731
    # Dividing by q·N = 4 whoever replied: two updates move the adapter half as far as four,
    # and one user's update moves it by at most C / (q·N).
    assert moved(full) == pytest.approx(0.5, rel=1e-4) and moved(dropped) == pytest.approx(0.25, rel=1e-4)
    one = dp_fedavg_round(state, _updates(state, [50.0]), mechanism=mech, population=16, rng=noise_generator(0))
    assert moved(one) == pytest.approx(1.0 / 4, rel=1e-4)
    assert full.event is None  # z = 0: nothing to account, epsilon is infinite
    # The SecAgg+ path only sees the sum of client-clipped deltas and calls `release`.
    noisy = Mechanism(noise_multiplier=0.9, clipping_norm=1.0, sample_rate=0.25)
    updates = _updates(state, [0.3, 0.9, 0.6])
    total, _ = clipped_sum(state, updates, clipping_norm=1.0)
    a = release(state, total, mechanism=noisy, population=16, rng=noise_generator(5, 1), contributions=3)
    b = dp_fedavg_round(state, updates, mechanism=noisy, population=16, rng=noise_generator(5, 1))
    assert all(np.array_equal(a.state[k], b.state[k]) for k in KEYS) and a.event == b.event


def test_poisson_participation_secret_by_default_seeded_on_request():
    secret = [participants(256, sample_rate=0.5) for _ in range(2)]
    assert secret[0] != secret[1]  # the OS's CSPRNG: equal with probability 2^-256
    assert participants(256, sample_rate=0.5, seed=3, rnd=2) == participants(256, sample_rate=0.5, seed=3, rnd=2)
    assert participants(256, sample_rate=0.5, seed=3, rnd=2) != participants(256, sample_rate=0.5, seed=3, rnd=3)
    n, q = 20000, 0.1
    for draw in (participants(n, sample_rate=q), participants(n, sample_rate=q, seed=0, rnd=1)):
        assert abs(len(draw) - q * n) < 4 * math.sqrt(n * q * (1 - q))  # each independently with q
    assert participants(10, sample_rate=1.0) == list(range(10))

    # The coordinator's rounds draw from it under DP (q = fraction_train), and fixed-size without.
    from coordinator.sampling import sample_round

    nodes = list(range(1000, 1040))
    dp = load_federated(None, ["privacy.federate_base_adapter=true", "privacy.noise_multiplier=1.0",
                               "federation.fraction_train=0.3", "federation.sampling_seed=4"])
    picked, q = sample_round(nodes, dp, 5)
    assert q == 0.3 and picked == [nodes[i] for i in participants(40, sample_rate=0.3, seed=4, rnd=5)]
    plain = load_federated(None, ["federation.fraction_train=0.3"])
    picked, q = sample_round(nodes, plain, 5)
    assert len(picked) == 12 and q == 12 / 40


def test_robust_weights_cap_a_claimed_example_count():
    assert robust_weights([6, 6, 1e30], max_ratio=4) == [6, 6, 24]
    assert robust_weights([1e30, 6], max_ratio=4) == [24, 6]
    assert robust_weights([3, 1e30], max_ratio=0) == [1.0, 1.0]


def test_without_dp_a_poisoned_update_and_an_inflated_count_stay_within_the_bound(tmp_path, tiny_model_dir):
    """One client claims 1e30 examples, another sends an update of norm 1e6: the round's global
    adapter moves at most federation.max_update_norm, and the liar does not take the average over."""
    from flwr.app import Array, ArrayRecord
    from safetensors.numpy import load_file

    import inprocess_federation as fedkit
    from shared.protocol import ARRAYS, METRICS

    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "federation.rounds=1", 'methods=["non-personalized"]',
                            "privacy.federate_base_adapter=true", "federation.max_update_norm=0.5",
                            "federation.personal_refresh_epochs=0", "data.users=3")
    _, names = fedkit.prepare(spec, run)
    def intercept(node, reply):
        if reply.has_error() or reply.metadata.message_type != "train":
            return reply
        arrays = {k: a.numpy().copy() for k, a in reply.content[ARRAYS].items()}
        k = sorted(arrays)[0]
        if node == 100:  # inflated: claims 1e30 examples, for an update of norm ~5 (10x the bound)
            reply.content[METRICS]["num-examples"] = 1e30
            arrays[k] = arrays[k] + np.float32(5.0 / math.sqrt(arrays[k].size))
        elif node == 101:  # poisoned: an update of norm ~1e6 in one direction
            arrays[k] = arrays[k] - np.float32(1e6 / math.sqrt(arrays[k].size))
        reply.content[ARRAYS] = ArrayRecord({j: Array(v) for j, v in arrays.items()})
        return reply

    summary = fedkit.run(spec, run, fedkit.local_grid(spec, run, names, intercept=intercept))
    assert summary["rounds"][0]["aggregated"] == 3
    init = load_file(str(run / "artifacts" / "base-adapter-init" / "adapter_model.safetensors"))
    final = load_file(str(run / "base_adapter" / "adapter_model.safetensors"))
    moved = norm({k: final[k].astype(np.float64) - init[k] for k in final})
    assert 0 < moved <= 0.5 * (1 + 1e-5), moved
    assert summary["rounds"][0]["clipped"] >= 1
