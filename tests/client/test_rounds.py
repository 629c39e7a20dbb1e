"""What a user's machine does in a round (client/rounds.py), called directly, without Flower's
messaging (tests/client/test_client_app.py runs the same handlers through the ClientApp): a
synthetic user's data directory laid out as on a real machine, the tiny random model as the
cached model artifact."""

import json

import numpy as np
import pytest

import client.rounds as rounds
import inprocess_federation as fedkit
from client.artifacts import ArtifactCache
from client.host import ModelHost
from client.personal import PersonalAdapters
from client.userdir import UserDir
from shared.adapters import adapter_version, read_manifest
from shared.data import make_synthetic
from shared.protocol import KIND_MODEL, ClientError, ProtocolError, RoundConfig, manifest_for_dir

TASK = "synthetic-tag"


@pytest.fixture(scope="module")
def runtime():
    """One NodeRuntime for this module's rounds (the model loads once), the process's own after."""
    saved, rounds.RUNTIME = rounds.RUNTIME, rounds.NodeRuntime()
    yield rounds.RUNTIME
    rounds.RUNTIME = saved


def _node(tmp_path, tiny_model_dir, *overrides, simulated=True):
    """A user directory as `oppu simulate` lays it out (user.json, history.json, queries.json) and
    a client cache that holds the model artifact under its content id."""
    user = make_synthetic(TASK, n_base_users=1, n_eval_users=1, history_size=6, seed=4).eval_users[0]
    d = tmp_path / "user"
    d.mkdir(parents=True)
    (d / "user.json").write_text(json.dumps({"user_id": user.user_id, "task": TASK}))
    (d / "history.json").write_text(json.dumps([{"id": it.id, "fields": dict(it.fields), "time": it.time}
                                                 for it in user.history]))
    (d / "queries.json").write_text(json.dumps([{"id": q.id, "input": q.input, "target": q.target}
                                                 for q in user.queries[:2]]))
    model_id = manifest_for_dir(tiny_model_dir, KIND_MODEL).id
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / model_id).symlink_to(tiny_model_dir, target_is_directory=True)
    spec = fedkit.tiny_spec(tiny_model_dir, tmp_path / "run", *overrides)
    return rounds.Node(spec, UserDir(d), ArtifactCache(tmp_path / "cache"), simulated=simulated), model_id, user


def _config(model_id, **kw):
    return RoundConfig(server_round=1, task=TASK, model=model_id, base_adapter="b" * 64, **kw)


def _global_state(node, model_id):
    """The coordinator's base adapter as it arrives: numpy arrays of every base-adapter tensor (copies,
    as deserialized ones are: a float32 tensor's .numpy() is a view of the live parameter)."""
    engine = rounds.engine_for(node, model_id)
    return {k: v.detach().float().cpu().numpy().copy() for k, v in engine.base_state().items()}


def test_a_federated_train_round_returns_only_the_updated_base_adapter(tmp_path, tiny_model_dir, runtime):
    node, model_id, user = _node(tmp_path, tiny_model_dir)
    arrays = _global_state(node, model_id)
    update, metrics = rounds.train(node, _config(model_id, federate=True, methods="OPPU"), arrays)

    assert list(update) == list(arrays)  # the same tensors, in the same order, nothing else
    assert all(update[k].shape == arrays[k].shape and update[k].dtype == np.float32 for k in arrays)
    assert any(not np.array_equal(update[k], arrays[k]) for k in arrays)  # trained locally
    assert metrics["history-items"] == len(user.history) and metrics["base-steps"] >= 1
    assert metrics["num-examples"] >= len(user.history) and np.isfinite(metrics["base-loss"])
    assert np.isfinite(metrics["personal-plain-loss"])
    assert all(isinstance(v, float) for v in metrics.values())
    # The personal adapter stays on this disk, published; the round is recorded for the daemon.
    personal = node.user.personal_root("plain")
    assert (personal / "CURRENT").read_text().strip() == "v000001"
    assert json.loads((node.user.path / "federation.json").read_text())["rounds"] == 1


def test_a_personal_adapter_a_round_publishes_records_its_base_adapter_and_goes_stale_when_it_changes(
        tmp_path, tiny_model_dir, runtime):
    """Issue 17 item 3 for adapters trained by a federated round's ClientApp: the daemon's check
    (client.host.ModelHost, on the same directory) covers them as it covers its own."""
    node, model_id, _ = _node(tmp_path, tiny_model_dir)
    first = _global_state(node, model_id)
    rng = np.random.default_rng(7)
    second = {k: v + (0.05 * rng.standard_normal(v.shape)).astype(v.dtype) if ".lora_B." in k else v
              for k, v in first.items()}  # the next round's aggregate: other weights, another version
    rounds.train(node, _config(model_id, federate=False, methods="OPPU"), first)

    personal = PersonalAdapters(node.user.personal_root("plain"))
    published, _ = personal.resolve()
    assert "base_adapter" in published.manifest.train, published.manifest.train
    received = node.user.path / "base_adapter"  # the round's base adapter, on disk for the daemon
    base_v1 = adapter_version(read_manifest(received))
    assert published.manifest.train["base_adapter"] == base_v1
    host = ModelHost(rounds.engine_for(node, model_id), personal, task=TASK, received_dir=received)
    assert host.base_info == {**host.base_info, "version": base_v1, "source": "coordinator"}
    assert host.stale is None and host.published.version == 1

    # The next round's evaluation delivers another base adapter: the daemon no longer answers with it.
    rounds.evaluate(node, _config(model_id, methods=""), second)
    base_v2 = adapter_version(read_manifest(received))
    assert base_v2 != base_v1 and host.refresh()
    assert host.stale is not None and f"trained on base adapter {base_v1}" in host.stale and base_v2 in host.stale

    # The round after refreshes it on that base and records so: it answers again.
    rounds.train(node, _config(model_id, federate=False, methods="OPPU"), second)
    assert adapter_version(read_manifest(received)) == base_v2  # equal weights, equal version
    host.refresh()
    assert host.published.version == 2 and host.published.manifest.train["refreshed"] is True
    assert host.published.manifest.train["base_adapter"] == base_v2 and host.stale is None


def test_a_train_round_without_federation_sends_no_tensors(tmp_path, tiny_model_dir, runtime):
    node, model_id, user = _node(tmp_path, tiny_model_dir)
    update, metrics = rounds.train(node, _config(model_id, federate=False, methods=""), _global_state(node, model_id))
    assert update is None
    assert metrics["num-examples"] == len(user.history) and "base-loss" not in metrics


def test_evaluate_scores_each_method_and_keeps_the_answers_at_home(tmp_path, tiny_model_dir, runtime):
    node, model_id, user = _node(tmp_path, tiny_model_dir)
    arrays = _global_state(node, model_id)
    metrics = rounds.evaluate(node, _config(model_id, methods="non-personalized,OPPU"), arrays)

    assert metrics["num-queries"] == 2
    scored = {k.split("/")[0] for k in metrics if "/" in k}
    assert scored == {"non-personalized", "OPPU"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    predictions = json.loads((node.user.path / "predictions.json").read_text())
    assert set(predictions) == {"non-personalized", "OPPU"}
    assert all(set(p) == {q.id for q in user.queries[:2]} for p in predictions.values())
    # OPPU had no adapter yet: this user's was trained here (never sampled for training) and kept.
    assert (node.user.personal_root("plain") / "CURRENT").is_file()
    assert (node.user.path / "base_adapter" / "oppu_adapter.json").is_file()


def test_a_round_for_another_task_or_a_base_adapter_that_does_not_fit_is_refused(tmp_path, tiny_model_dir, runtime):
    node, model_id, _ = _node(tmp_path, tiny_model_dir)
    arrays = _global_state(node, model_id)
    with pytest.raises(ClientError, match="this user's data is for task 'synthetic-tag', the run is 'amazon-rating'"):
        rounds.train(node, RoundConfig(1, "amazon-rating", model_id, "b" * 64), arrays)
    key = next(iter(arrays))
    with pytest.raises(ProtocolError, match="the coordinator's base adapter does not fit"):
        rounds.train(node, _config(model_id), arrays | {key: arrays[key][:1]})
    assert not (node.user.path / "federation.json").exists()  # no round was recorded
    with pytest.raises(ClientError, match="is not in the client cache"):
        rounds.train(node, _config("c" * 64), arrays)


def test_reply_numbers_under_dp_only_where_the_operator_and_the_user_allow(tmp_path, tiny_model_dir):
    dp = ("privacy.federate_base_adapter=true", "privacy.noise_multiplier=1.0")
    numbers = {"base-loss": 0.5, "num-examples": 12.0}
    deployed, _, _ = _node(tmp_path / "a", tiny_model_dir, *dp, simulated=False)
    assert deployed.spec.dp and rounds.reply_metrics(deployed, numbers) == {}
    opted_in, _, _ = _node(tmp_path / "b", tiny_model_dir, *dp, "federation.report_client_metrics=true",
                           simulated=False)
    assert rounds.reply_metrics(opted_in, numbers) == numbers
    refused = rounds.Node(opted_in.spec, opted_in.user, opted_in.cache, simulated=False, allow_metrics=False)
    assert rounds.reply_metrics(refused, numbers) == {}
    simulated, _, _ = _node(tmp_path / "c", tiny_model_dir, *dp)
    assert rounds.reply_metrics(simulated, numbers) == numbers  # the researcher owns simulated data
    no_dp, _, _ = _node(tmp_path / "d", tiny_model_dir, simulated=False)
    assert rounds.reply_metrics(no_dp, numbers) == numbers
