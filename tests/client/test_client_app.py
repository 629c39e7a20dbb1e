"""The ClientApp on a user's machine: the base model is loaded once per process (not per round or
user), personal adapters live in the user's directory and survive rounds, the daemon's contract
files are written, and misconfigured nodes answer with a clear error."""

import json

import inprocess_federation as fedkit
from shared.protocol import ARRAYS


def test_rounds_reuse_the_model_and_keep_personal_adapters_at_home(tmp_path, tiny_model_dir, monkeypatch):
    import client.rounds as rounds
    import shared.engine

    built = []
    real_init = shared.engine.Engine.__init__

    def counting_init(self, *a, **k):
        built.append(a[0])
        real_init(self, *a, **k)

    monkeypatch.setattr(shared.engine.Engine, "__init__", counting_init)
    monkeypatch.setattr(rounds, "RUNTIME", rounds.NodeRuntime())
    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "federation.rounds=2", 'methods=["non-personalized", "OPPU"]')
    _, names = fedkit.prepare(spec, run)
    replies = []
    grid = fedkit.local_grid(spec, run, names, intercept=lambda n, r: replies.append(r) or r)
    summary = fedkit.run(spec, run, grid)

    assert summary["status"] == "completed"
    assert len(built) == 2  # the coordinator's engine and one for all clients, rounds and users
    assert len(rounds.RUNTIME.engines) == 1
    # The base adapter is not federated in this run: train replies carry numbers only.
    assert all(ARRAYS not in r.content.array_records for r in replies if r.metadata.message_type == "train")
    for n in names:
        d = run / "users" / n
        personal = d / "personal-plain"  # OPPU's adapter (the primary slot, personal/, is for rag)
        assert (personal / "CURRENT").read_text().strip() == "v000002"
        v1 = json.loads((personal / "v000001" / "oppu_adapter.json").read_text())
        v2 = json.loads((personal / "v000002" / "oppu_adapter.json").read_text())
        assert v1["train"]["refreshed"] is False and v2["train"]["refreshed"] is True
        assert v2["role"] == "personal" and v2["data"]["history_items"] == 6
        status = json.loads((d / "federation.json").read_text())
        assert status["rounds"] == 2 and status["epsilon"] is None
        assert (d / "base_adapter" / "oppu_adapter.json").exists()
        preds = json.loads((d / "predictions.json").read_text())
        assert set(preds) == {"non-personalized", "OPPU"}


def test_misconfigured_nodes_get_a_clear_error(tmp_path, tiny_model_dir):
    from flwr.app import Message, RecordDict

    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run)
    _, names = fedkit.prepare(spec, run)
    grid = fedkit.local_grid(spec, run, names[:1])
    node = grid.get_node_ids()[0]
    del grid._contexts[node].node_config["data-dir"]
    (reply,) = grid.send_and_receive([Message(RecordDict(), dst_node_id=node, message_type="query.inventory")])
    assert reply.has_error() and "data-dir" in reply.error.reason

    grid._contexts[node].node_config["data-dir"] = str(tmp_path / "nowhere")
    (reply,) = grid.send_and_receive([Message(RecordDict(), dst_node_id=node, message_type="query.inventory")])
    assert reply.has_error() and "does not exist" in reply.error.reason and "nowhere" not in reply.error.reason


def test_record_level_dp_sgd_on_the_users_machine(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "federation.rounds=1", "data.users=2", 'methods=["OPPU"]',
                            "privacy.federate_base_adapter=true", 'privacy.record_level="both"',
                            "privacy.record_noise_multiplier=1.0", "privacy.record_clipping_norm=0.5")
    _, names = fedkit.prepare(spec, run)
    summary = fedkit.run(spec, run, fedkit.local_grid(spec, run, names))
    assert summary["rounds"][0]["train"]["record-epsilon-base"] > 0
    for n in names:
        d = run / "users" / n
        manifest = json.loads((d / "personal-plain" / "v000001" / "oppu_adapter.json").read_text())
        assert manifest["privacy"]["record_epsilon"] > 0 and manifest["privacy"]["record_delta"] == 1e-5
        for what in ("base", "personal-plain"):
            assert json.loads((d / "federation" / f"record-privacy-{what}.json").read_text())["history"]


def test_an_adapter_not_adopted_is_not_used(tmp_path, tiny_model_dir):
    """A user whose personal adapter loses to the base on validation (here: too little history
    to train one besides validating) keeps none, says why, and OPPU answers as non-personalized."""
    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "federation.rounds=1", "data.users=2",
                            'methods=["non-personalized", "OPPU"]', "selection.enabled=true", "selection.min_train=50")
    _, names = fedkit.prepare(spec, run)
    summary = fedkit.run(spec, run, fedkit.local_grid(spec, run, names))
    assert summary["status"] == "completed"
    d = run / "users" / names[0]
    record = json.loads((d / "federation" / "selection-plain.json").read_text())
    assert record["adopted"] is False and "too little history" in record["reason"]
    assert not (d / "personal-plain" / "CURRENT").exists()
    preds = json.loads((d / "predictions.json").read_text())
    assert preds["OPPU"] == preds["non-personalized"]
