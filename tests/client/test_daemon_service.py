"""ClientService in-process with the tiny engine: answering ahead of training, exact versions."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from client.service import ClientService
from shared.config import SelectionSpec, TrainSpec
from client.settings import DaemonSpec

# Versions and publication are under test, on a random tiny model: every job adopts its adapter
# (adoption itself: tests/shared/test_personal_selection.py, test_job_that_adopts_nothing_publishes_nothing).
ALWAYS_ADOPT = SelectionSpec(enabled=False)
from shared.data.synthetic import make_synthetic


@pytest.fixture(scope="module")
def prompt_tuning_engine(tiny_model_dir):
    from shared.config import AdapterSpec, BaseModelSpec
    from shared.engine import Engine

    return Engine(BaseModelSpec(path=str(tiny_model_dir), quantization="none"),
                  personal_adapter=AdapterSpec(peft_type="prompt_tuning", num_virtual_tokens=4))


@pytest.fixture(params=["lora", "prompt_tuning"])
def service(request, tmp_path):
    engine = request.getfixturevalue("tiny_engine" if request.param == "lora" else "prompt_tuning_engine")
    spec = DaemonSpec(task="synthetic-tag", retrain_after=0, keep_versions=2,
                      personal_adapter=engine.personal_adapter_spec,
                      personal_train=TrainSpec(epochs=1, lr=2e-2, batch_size=4), selection=ALWAYS_ADOPT)
    svc = ClientService(spec, tmp_path / "dir", engine=engine)
    user = make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=40, n_queries=3, seed=3).eval_users[0]
    svc.add(user.history)
    yield svc, [q.input for q in user.queries]
    svc.close()
    engine.reset_personal()


def _wait(svc, job, timeout=120):
    done = svc.jobs.wait(job.id, timeout)
    assert done.state == "succeeded", done.error
    return done


def test_ask_during_training_is_served_promptly_by_the_published_version(service):
    svc, questions = service
    _wait(svc, svc.train())
    v1 = [svc.ask(q) for q in questions]
    assert {a["personal_version"] for a in v1} == {1}
    long_job = svc.train(overrides={"epochs": 40})
    deadline = time.monotonic() + 60
    while svc.jobs.get(long_job.id).steps_done < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    during = [svc.ask(q) for q in questions]
    job = svc.jobs.get(long_job.id)
    assert job.state == "running" and 0 < job.steps_done < job.steps_total
    # The answers come from v1, not from the weights being trained, and did not wait for the job.
    assert [a["answer"] for a in during] == [a["answer"] for a in v1]
    assert all(a["personal_version"] == 1 for a in during)
    assert max(a["waited_for_model_s"] for a in during) < 2.0
    svc.jobs.cancel(long_job.id)
    assert svc.jobs.wait(long_job.id, 60).state == "cancelled"
    assert svc.personal.current_version() == 1 and svc.ask(questions[0])["answer"] == v1[0]["answer"]


def test_interleaved_answers_do_not_change_what_training_learns(service):
    svc, questions = service
    engine = svc.engine
    _wait(svc, svc.train(overrides={"epochs": 3}))
    alone = {k: v.clone() for k, v in engine.personal_state().items()}
    stop = threading.Event()
    asked: list[dict] = []

    def asker() -> None:  # a client asking back to back for the whole job
        while not stop.is_set():
            asked.append(svc.ask(questions[0]))

    t = threading.Thread(target=asker)
    t.start()
    try:
        _wait(svc, svc.train(overrides={"epochs": 3}))
    finally:
        stop.set()
        t.join()
    mixed = engine.personal_state()
    assert all(torch.equal(alone[k], mixed[k]) for k in alone)
    assert len(asked) >= 5 and {a["personal_version"] for a in asked} <= {1, 2}
    assert svc.personal.versions() == [1, 2]


def test_automatic_retraining_after_enough_new_items(tiny_engine, tmp_path):
    spec = DaemonSpec(task="synthetic-tag", retrain_after=30, personal_train=TrainSpec(epochs=1, lr=2e-2),
                      selection=ALWAYS_ADOPT)
    svc = ClientService(spec, tmp_path / "dir", engine=tiny_engine)
    try:
        items = make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=70, n_queries=1,
                               seed=5).eval_users[0].history
        assert svc.add(items[:29])["auto_train_job"] is None
        job_id = svc.add(items[29:40])["auto_train_job"]
        assert job_id is not None and svc.jobs.get(job_id).trigger == "auto"
        _wait(svc, svc.jobs.get(job_id))
        assert svc.status()["personal_adapter"]["data"]["history_items"] == 40
        assert svc.add(items[40:69])["auto_train_job"] is None  # 29 new since: below the threshold
        assert svc.add(items[69:])["auto_train_job"] is not None
        svc.jobs.wait(svc.jobs.list()[0].id, 60)
    finally:
        svc.close()
        tiny_engine.reset_personal()


def test_unreachable_coordinator_is_retried_with_backoff_while_answering(tiny_engine, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    spec = DaemonSpec(task="synthetic-tag", retrain_after=0, coordinator=dead, insecure=True, backoff_initial=0.2,
                      backoff_max=1.0)
    svc = ClientService(spec, tmp_path / "dir", engine=tiny_engine)
    try:
        svc.start()
        svc.add(make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=5, n_queries=1,
                               seed=2).eval_users[0].history)
        deadline = time.monotonic() + 90
        while svc.supervisor.starts < 2 and time.monotonic() < deadline:
            t0 = time.perf_counter()
            assert svc.ask("Which tag? description: a funny film")["personal_version"] is None
            # The API never waits for the federation (generous: a busy 2-core CI machine is slow).
            assert time.perf_counter() - t0 < 10.0
            time.sleep(0.2)
        fed = svc.status()["federation"]
        assert fed["coordinator"] == dead and svc.supervisor.starts >= 2, fed
        assert fed["transport"] == "insecure" and fed["app_trust"]["trusted_app_hashes"] == [], fed
        assert fed["last_error"] and "exited with code" in fed["last_error"]
        log = (tmp_path / "dir" / "logs" / "supernode.log").read_text()
        assert "--superlink " + dead in log and "data-dir=" in log
    finally:
        t0 = time.monotonic()
        svc.close()
        assert time.monotonic() - t0 < 15
        tiny_engine.reset_personal()


def test_pag_profile_then_oppu_pag(tiny_engine, tmp_path):
    spec = DaemonSpec(task="synthetic-tag", retrain_after=0, augmentation="pag",
                      personal_train=TrainSpec(epochs=1, lr=2e-2), selection=ALWAYS_ADOPT)
    svc = ClientService(spec, tmp_path / "dir", engine=tiny_engine)
    try:
        user = make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=12, n_queries=1,
                              seed=6).eval_users[0]
        svc.add(user.history)
        assert svc.ask(user.queries[0].input)["method"] == "PAG"
        assert svc.store.get_profile() is not None  # generated once, cached in the store
        from client.snapshot import read_snapshot, snapshot_path  # ... and given to the ClientApp

        assert read_snapshot(snapshot_path(svc.store.path)).profile == svc.store.get_profile()
        _wait(svc, svc.train())
        assert svc.ask(user.queries[0].input)["method"] == "OPPU+PAG"
    finally:
        svc.close()
        tiny_engine.reset_personal()


def test_job_that_adopts_nothing_publishes_nothing_and_says_why(tiny_engine, tmp_path):
    spec = DaemonSpec(task="synthetic-tag", retrain_after=0, personal_train=TrainSpec(epochs=1, lr=2e-2),
                      selection=SelectionSpec(min_train=50))  # 40 items: too few to train besides validating
    svc = ClientService(spec, tmp_path / "dir", engine=tiny_engine)
    try:
        user = make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=40, n_queries=1,
                              seed=3).eval_users[0]
        svc.add(user.history)
        done = _wait(svc, svc.train())
        assert done.result["adopted"] is False and "too little history" in done.result["selection"]
        assert "version" not in done.result and svc.personal.versions() == []
        assert svc.ask(user.queries[0].input)["personal_version"] is None
    finally:
        svc.close()
        tiny_engine.reset_personal()


def test_the_daemon_owns_its_store_and_keeps_the_clientapps_snapshot_current(tiny_engine, tmp_path):
    from client.snapshot import Snapshot, read_snapshot, snapshot_path
    from client.store import StoreInUse

    spec = DaemonSpec(task="synthetic-tag", retrain_after=0, selection=ALWAYS_ADOPT)
    data = tmp_path / "dir"
    svc = ClientService(spec, data, engine=tiny_engine)
    snap = snapshot_path(data / "history")
    try:
        assert read_snapshot(snap) == Snapshot("synthetic-tag", None, ())  # before a SuperNode could start
        with pytest.raises(StoreInUse, match="already open here"):
            ClientService(spec, data, engine=tiny_engine)
        items = make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=12, n_queries=1,
                               seed=4).eval_users[0].history
        svc.add(items[6:])
        assert list(read_snapshot(snap).items) == svc.store.items()
        svc.add(items[:6])  # older items: the snapshot stays chronological, as the store lists it
        assert list(read_snapshot(snap).items) == svc.store.items() == sorted(items, key=lambda it: it.time)
        assert "history/history.snapshot.jsonl" in svc.status()["history"]["derived_files"]
        svc.forget()
        assert svc.status()["history"]["derived_files"] == []  # an empty snapshot carries nothing
        # forget leaves the owner's lock and an empty snapshot; no item's text is left in history/.
        assert read_snapshot(snap) == Snapshot("synthetic-tag", None, ())
        assert {"owner.lock", snap.name} <= {p.name for p in (data / "history").iterdir()}
        stored = b"".join(p.read_bytes() for p in (data / "history").rglob("*") if p.is_file())
        assert not [it.id for it in items if it.fields["description"].encode() in stored]
    finally:
        svc.close()
