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


def test_a_round_reads_the_daemons_snapshot_while_the_api_adds_items(tmp_path, tiny_model_dir, tiny_engine,
                                                                      monkeypatch):
    """The daemon owns the Chroma store (its owner.lock is held for the whole test, so the
    ClientApp could not open it); the ClientApp trains on the snapshot, a whole acknowledged state,
    while items keep arriving through the API; afterwards the store holds exactly the acknowledged
    items and the snapshot equals it."""
    import threading
    import time

    from fastapi.testclient import TestClient

    import client.rounds as rounds
    from client.api import create_app
    from client.client_app import app
    from client.service import ClientService
    from client.settings import DaemonSpec
    from client.snapshot import read_snapshot, snapshot_path
    from client.store import ChromaHistoryStore
    from localgrid import LocalGrid
    from shared.config import SelectionSpec, to_run_config
    from shared.data.synthetic import make_synthetic
    from shared.protocol import METRICS
    from shared.tasks import get_task

    monkeypatch.setattr(rounds, "RUNTIME", rounds.NodeRuntime())
    data = tmp_path / "daemon"
    data.mkdir()
    (data / "daemon.toml").write_text('task = "synthetic-tag"\n')
    svc = ClientService(DaemonSpec(task="synthetic-tag", retrain_after=0, selection=SelectionSpec(enabled=False)),
                        data, engine=tiny_engine)
    user = make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=240, n_queries=1,
                          seed=5).eval_users[0]
    rows = [{"id": it.id, "fields": dict(it.fields), "time": it.time} for it in user.history]
    token = "t" * 43
    acked: list[str] = []
    counts = {svc.add(user.history[:12])["history_count"]}  # what the snapshot held at some point
    acked += [it.id for it in user.history[:12]]
    during: list[float] = []  # when each batch added while the round ran was acknowledged
    stop, round_running = threading.Event(), threading.Event()

    def api_adds() -> None:
        with TestClient(create_app(svc, token), base_url="http://127.0.0.1") as api:
            for start in range(12, len(rows), 4):
                if stop.is_set():
                    return
                r = api.post("/v1/history", json={"items": rows[start:start + 4]},
                             headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 200, r.text
                acked.extend(x["id"] for x in rows[start:start + 4])
                counts.add(r.json()["history_count"])
                if round_running.is_set():
                    during.append(time.monotonic())
                time.sleep(0.05)

    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "federation.rounds=1", "federation.min_clients=1", 'methods=["OPPU"]',
                            'retrieval.store="chroma"', 'retrieval.retriever="dense"')
    seen = []
    grid = LocalGrid(app, {100: {"data-dir": str(data)}}, to_run_config(spec), intercept=lambda n, r: seen.append(r) or r)
    adder = threading.Thread(target=api_adds)
    try:
        adder.start()
        round_running.set()
        summary = fedkit.run(spec, run, grid)
        round_running.clear()
    finally:
        stop.set()
        adder.join(timeout=120)
        svc.close()
    assert summary["status"] == "completed"
    (train,) = [r for r in seen if r.metadata.message_type == "train"]
    assert not train.has_error()
    assert train.content.metric_records[METRICS]["history-items"] in counts  # one acknowledged state, whole
    assert during, "no batch was acknowledged while the round ran"

    with ChromaHistoryStore(data / "history", get_task("synthetic-tag").item_text) as store:  # opens: intact
        ids = [it.id for it in store.items()]
        assert store.count() == len(acked) and set(ids) == set(acked)
        snap = read_snapshot(snapshot_path(data / "history"))
        assert snap.task == "synthetic-tag" and [it.id for it in snap.items] == ids
        assert list(snap.items) == store.items()


def test_a_failed_round_does_not_keep_a_simulated_users_store(tmp_path):
    """A simulated user's Chroma store has one owner: a round that fails half-way closes it, so the
    next round (in this process or another) can open it."""
    from types import SimpleNamespace

    import pytest

    import client.rounds as rounds
    from client.store import ChromaHistoryStore
    from client.userdir import UserDir
    from shared.records import HistoryItem
    from shared.tasks import get_task

    task = get_task("synthetic-tag")
    with ChromaHistoryStore(tmp_path / "history", task.item_text) as store:
        store.add([HistoryItem("h1", {"description": "a heist film", "tag": "action"}, 1)])
    retrieval = SimpleNamespace(store="chroma", retriever="bm25")
    node = SimpleNamespace(user=UserDir(tmp_path), spec=SimpleNamespace(experiment=SimpleNamespace(retrieval=retrieval)))
    with pytest.raises(RuntimeError, match="training failed"):
        with rounds.history_store(node, task) as store:
            assert [it.id for it in store.items()] == ["h1"]
            raise RuntimeError("training failed")
    with ChromaHistoryStore(tmp_path / "history", task.item_text) as again:
        assert again.count() == 1
