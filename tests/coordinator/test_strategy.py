"""Aggregation: poisoned updates (NaN, wrong shape, wrong keys) are rejected and logged while the
round completes with the rest; a failed client does not stop the run; FFA-LoRA exchanges only B;
FedProx's proximal term pulls local training towards the global adapter; FedAdam's server state
is checkpointed; reported numbers are averaged by query count, RMSE as pooled RMSE."""

import math

import numpy as np
import pytest
import torch

import inprocess_federation as fedkit
from coordinator.strategy import mean_metrics
from shared.protocol import ARRAYS, is_lora_b

FAST = ['methods=["non-personalized", "OPPU"]', "privacy.federate_base_adapter=true"]


def _tamper(reply, how):
    from flwr.app import Array, ArrayRecord

    arrays = {k: a.numpy().copy() for k, a in reply.content[ARRAYS].items()}
    key = sorted(arrays)[0]
    if how == "nan":
        arrays[key][0, 0] = np.nan
    elif how == "shape":
        arrays[key] = arrays[key][:-1]
    elif how == "keys":
        arrays["base_model.model.injected.weight"] = arrays.pop(key)
    reply.content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return reply


def test_poisoned_updates_are_rejected_and_failed_clients_skipped(tmp_path, tiny_model_dir, caplog):
    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "data.users=4", *FAST)
    _, names = fedkit.prepare(spec, run)
    plan = {1: {100: "nan", 101: "shape"}, 2: {100: "keys"}}
    rounds_seen = []

    def intercept(node, reply):
        if reply.has_error() or reply.metadata.message_type != "train":
            return reply
        rnd = len([r for r in rounds_seen if r == node]) + 1
        rounds_seen.append(node)
        how = plan.get(rnd, {}).get(node)
        return _tamper(reply, how) if how else reply

    grid = fedkit.local_grid(spec, run, names, intercept=intercept, fail={102})
    with caplog.at_level("WARNING"):
        summary = fedkit.run(spec, run, grid)
    assert summary["status"] == "completed" and len(summary["rounds"]) == 2
    r1, r2 = summary["rounds"]
    assert "NaN" in r1["rejected"]["100"] and "shape" in r1["rejected"]["101"]
    assert "wrong keys" in r2["rejected"]["100"]
    assert "102" in r1["failed"] and r1["aggregated"] == 1 and r2["aggregated"] == 2
    assert "rejected: " in caplog.text
    from coordinator.checkpoint import load

    ckpt = load(run / "checkpoint")
    assert ckpt.round == 2 and ckpt.history[0]["aggregated"] == 1
    final = summary["final"]
    assert final["users"] == 3  # the unreachable user cannot be evaluated either
    assert np.isfinite([v for v in final.values()]).all()


def test_validate_reply_reasons():
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from coordinator.strategy import validate_reply

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    sent = Message(RecordDict(), dst_node_id=5, message_type="train")
    expected = {"a.lora_B.weight": (4, 2)}

    def reply(arrays, n=3.0):
        content = RecordDict({"metrics": MetricRecord({"num-examples": n})})
        if arrays is not None:
            content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return Message(content, reply_to=sent)

    ok = np.zeros((4, 2), np.float32)
    assert validate_reply(reply({"a.lora_B.weight": ok}), expected, federate=True) is None
    assert "inf" in validate_reply(reply({"a.lora_B.weight": ok + np.inf}), expected, federate=True)
    assert "shape" in validate_reply(reply({"a.lora_B.weight": ok[:2]}), expected, federate=True)
    assert "wrong keys" in validate_reply(reply({"x": ok}), expected, federate=True)
    assert "num-examples" in validate_reply(reply({"a.lora_B.weight": ok}, n=-1.0), expected, federate=True)
    assert "dtype" in validate_reply(reply({"a.lora_B.weight": ok.astype(np.int32)}), expected, federate=True)
    assert "unexpected tensors" in validate_reply(reply({"a.lora_B.weight": ok}), expected, federate=False)
    assert validate_reply(reply(None), expected, federate=False) is None


def test_ffa_lora_exchanges_only_b_and_keeps_a_frozen(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "federation.rounds=1", "federation.ffa_lora=true",
                            "federation.local_train.lr=0.01", *FAST)
    _, names = fedkit.prepare(spec, run)
    sent_keys = []

    def intercept(node, reply):
        if reply.metadata.message_type == "train" and not reply.has_error():
            sent_keys.append(set(reply.content[ARRAYS]))
        return reply

    grid = fedkit.local_grid(spec, run, names, intercept=intercept)
    summary = fedkit.run(spec, run, grid)
    assert sent_keys and all(keys and all(is_lora_b(k) for k in keys) for keys in sent_keys)
    from safetensors.torch import load_file

    init = load_file(str(run / "artifacts" / "base-adapter-init" / "adapter_model.safetensors"))
    final = load_file(str(run / "base_adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(init[k], final[k]) for k in init if "lora_A" in k)
    assert any(not torch.equal(init[k], final[k]) for k in init if "lora_B" in k)
    r = summary["rounds"][0]["bytes_per_client"]
    full = sum(v.numel() * 4 for v in init.values())
    assert r["base_adapter_down"] < 0.75 * full and r["base_adapter_up"] == pytest.approx(r["base_adapter_down"], rel=0.1)


def test_fedprox_pulls_local_training_towards_the_global_adapter(tiny_engine):
    from shared.config import TrainSpec
    from shared.training import Example

    examples = [Example(f"Tag this movie: a space opera {i}", "sci-fi") for i in range(8)]
    spec = TrainSpec(epochs=2, lr=0.05, batch_size=4, seed=0)
    start = {k: v.clone() for k, v in tiny_engine.base_state().items()}

    def drift(mu):
        tiny_engine.set_base_state({k: v.clone() for k, v in start.items()})
        tiny_engine.train_base(examples, spec, proximal_mu=mu, progress=False)
        now = tiny_engine.base_state()
        return sum(float((now[k] - start[k]).pow(2).sum()) for k in start) ** 0.5

    free, prox = drift(0.0), drift(50.0)
    tiny_engine.set_base_state(start)
    assert prox < 0.8 * free


def test_fedadam_server_state_survives_in_the_checkpoint(tmp_path, tiny_model_dir):
    from coordinator.checkpoint import load
    from coordinator.strategy import build_strategy, load_strategy_state, strategy_state

    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "federation.rounds=1", 'federation.strategy="fedadam"',
                            "federation.server_lr=0.01", *FAST)
    _, names = fedkit.prepare(spec, run)
    fedkit.run(spec, run, fedkit.local_grid(spec, run, names))
    ckpt = load(run / "checkpoint")
    assert any(k.startswith("m_t/") for k in ckpt.strategy) and any(k.startswith("v_t/") for k in ckpt.strategy)
    fresh = build_strategy(spec)
    load_strategy_state(fresh, ckpt.strategy)
    again = strategy_state(fresh)
    assert set(again) == set(ckpt.strategy) and all(np.array_equal(again[k], ckpt.strategy[k]) for k in again)


def test_weighted_mean_and_pooled_rmse():
    # Two users: errors [1, 1, 1] (3 queries) and [3] (1 query).
    recs = [{"m/mae": 1.0, "m/rmse": 1.0, "num-queries": 3}, {"m/mae": 3.0, "m/rmse": 3.0, "num-queries": 1},
            {"m/mae": 9.0, "num-queries": 0}]  # weight 0: skipped
    out = mean_metrics(recs, "num-queries")
    pooled = np.array([1.0, 1.0, 1.0, 3.0])
    assert math.isclose(out["m/mae"], np.abs(pooled).mean())
    assert math.isclose(out["m/rmse"], math.sqrt((pooled ** 2).mean()))  # not (3*1 + 3)/4
    assert out["num-queries"] == 4
