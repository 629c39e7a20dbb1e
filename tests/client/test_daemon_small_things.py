"""What a person meets around the daemon's main path: forget without a terminal refuses with a
message, cancel says "cancelled", a start that cannot listen leaves no new directory behind, the
progress bar shows the job from its first second, the log tells each job's story, and a task
change is refused with commands that work."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from client import commands
from client.api import create_app
from client.daemon import run
from client.service import ClientService
from client.settings import DaemonSpec
from shared.config import SelectionSpec, TrainSpec
from shared.data.synthetic import make_synthetic

from in_process_cli import in_process_cli

TOKEN = "t" * 43


def _history(n: int, seed: int = 3):
    return make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=n, n_queries=1,
                          seed=seed).eval_users[0].history


@pytest.fixture(scope="module")
def service(tiny_engine, tmp_path_factory):
    spec = DaemonSpec(task="synthetic-tag", retrain_after=0, personal_train=TrainSpec(epochs=2, lr=2e-2, batch_size=4),
                      selection=SelectionSpec(checks=1))
    svc = ClientService(spec, tmp_path_factory.mktemp("small") / "dir", engine=tiny_engine)
    svc.add(_history(16))
    yield svc
    svc.close()
    tiny_engine.reset_personal()


@pytest.fixture
def run_cli(service, monkeypatch, capsys):
    """`oppu client ...` in-process; its requests go to the app under test, and are recorded."""
    client = TestClient(create_app(service, TOKEN), base_url="http://127.0.0.1",
                        headers={"Authorization": f"Bearer {TOKEN}"})
    return in_process_cli(client, monkeypatch, capsys)


def test_forget_without_a_terminal_refuses_with_a_message(service, run_cli, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # piped, nothing typed: not a terminal
    before = service.count()
    rc, _, err = run_cli("forget")
    assert rc == 2 and "nothing deleted" in err and "oppu client forget --yes" in err, err
    assert "Traceback" not in err and not [s for s in run_cli.sent if "forget" in s]
    assert service.count() == before


def test_cancel_says_cancelled_when_it_cancelled(service, run_cli):
    started = threading.Event()

    def waits_for_cancel(ctl):  # a job between two steps, as training is
        started.set()
        while not ctl.cancelled():
            time.sleep(0.02)
        return {"cancelled": True, "steps": 0}

    job = service.jobs.submit("train", waits_for_cancel)
    assert started.wait(10)
    rc, out, _ = run_cli("cancel", job.id)
    assert (rc, out.strip()) == (0, f"{job.id}: cancelled")
    rc, out, _ = run_cli("cancel", job.id)
    assert rc == 1 and out.strip() == f"{job.id}: already cancelled; nothing to cancel"


def test_a_start_that_cannot_listen_leaves_no_new_directory(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        spec = DaemonSpec(task="synthetic-tag", port=taken.getsockname()[1])
        fresh = tmp_path / "new" / "data"
        with pytest.raises(RuntimeError, match="cannot listen on 127.0.0.1"):
            run(fresh, spec)
        assert not (tmp_path / "new").exists()  # it made both levels, it removed both
        existing = tmp_path / "mine"
        existing.mkdir()
        (existing / "daemon.toml").write_text('task = "synthetic-tag"\n')
        with pytest.raises(RuntimeError, match="cannot listen on 127.0.0.1"):
            run(existing, spec)
        assert (existing / "daemon.toml").read_text() == 'task = "synthetic-tag"\n'  # not its to remove
    assert not [h for h in logging.getLogger().handlers if "daemon.log" in str(getattr(h, "baseFilename", ""))]


def test_the_progress_bar_shows_the_job_from_its_first_second(capsys):
    def job(state, phase="", done=0, total=0, loss=None):
        return {"id": "train-1", "state": state, "phase": phase, "steps_done": done, "steps_total": total,
                "loss": loss, "result": {}, "error": None}

    polls = iter([job("running", "building 40 training examples (rag)"),
                  job("running", "scoring base + base adapter on the 8 newest items, held out for validation"),
                  job("running", "training on 32 examples, validating on 8", 3, 10, 1.25),
                  job("succeeded", "training on 32 examples, validating on 8", 10, 10, 0.5)])

    class _Api:
        def call(self, method, path, **kw):
            return next(polls)

    final = commands._watch(_Api(), job("queued"))
    err = capsys.readouterr().err
    assert final["state"] == "succeeded"
    assert not re.search(r"(?<![.\d])0step", err) and "?step/s" not in err, err  # "0step [00:03, ?step/s]"
    frames = [f for f in err.replace("\n", "\r").split("\r") if f.strip()]
    assert frames[0].startswith("train-1: queued [00:00]"), frames[0]
    assert any(f.startswith("train-1: building 40 training examples (rag) [") for f in frames), frames
    assert any("3/10" in f and "loss=1.250" in f for f in frames), frames


def test_the_log_tells_each_jobs_start_steps_loss_validation_and_adoption(service, caplog):
    caplog.set_level(logging.INFO)  # what DIR/logs/daemon.log receives (client.daemon._setup_logging)
    job = service.train()
    done = service.jobs.wait(job.id, 120)
    assert done.state == "succeeded", done.error
    lines = [r.getMessage() for r in caplog.records if job.id in r.getMessage()]
    text = "\n".join(lines)
    assert lines[0] == f"job {job.id} started (train, trigger api, epochs 2, lr 0.02, augmentation rag)", text
    assert f"job {job.id}: building 16 training examples (rag)" in lines
    assert f"job {job.id}: scoring base + base adapter on the 4 newest items, held out for validation" in lines
    total = done.steps_total
    steps = [ln for ln in lines if ln.startswith(f"job {job.id}: step ")]
    assert steps[0].startswith(f"job {job.id}: step 1/{total}, loss ") and steps[-1].startswith(
        f"job {job.id}: step {total}/{total}, loss "), steps
    assert len(steps) <= 11  # every tenth of the way, not every step
    assert f"training job {job.id}: {done.result['selection']}" in lines  # Selection.summary(): validation
    assert done.result["selection"].startswith(("adopted on 4 validation items", "not adopted on 4 validation items"))
    # The decision in words, as the job result and status carry it (Selection.verdict).
    decision = done.result["decision"]
    assert decision.startswith(f"kept v{done.result['version']:06d}: validation accuracy " if done.result["adopted"]
                               else "not adopted: validation accuracy "), decision
    assert "on 4 held-out items" in decision
    assert f"training job {job.id}: {decision}" in lines and lines[-1] == f"job {job.id} succeeded", text


def test_a_task_change_is_refused_with_commands_that_work(tiny_engine, tmp_path):
    data = tmp_path / "dir"
    svc = ClientService(DaemonSpec(task="synthetic-tag", retrain_after=0), data, engine=tiny_engine)
    svc.add(_history(5))
    svc.close()
    with pytest.raises(ValueError) as refused:
        ClientService(DaemonSpec(task="synthetic-rating"), data, engine=tiny_engine)
    msg = str(refused.value)
    assert f"{data} holds 'synthetic-tag' data (5 history items) but daemon.task='synthetic-rating'" in msg
    assert f"oppu client daemon --data-dir {data} --task synthetic-tag" in msg
    assert "oppu client daemon --data-dir NEW_DIR --task synthetic-rating" in msg
    assert "run `oppu client forget --yes`, stop it, and start it with --task synthetic-rating" in msg
    # The path it offers works: the old task starts (the refused start left the store free) ...
    svc = ClientService(DaemonSpec(task="synthetic-tag", retrain_after=0), data, engine=tiny_engine)
    assert svc.count() == 5
    svc.forget()
    svc.close()
    # ... and after forget, the new one.
    svc = ClientService(DaemonSpec(task="synthetic-rating", retrain_after=0), data, engine=tiny_engine)
    try:
        assert svc.count() == 0 and svc.status()["daemon"]["task"] == "synthetic-rating"
        assert json.loads((data / "state.json").read_text())["task"] == "synthetic-rating"
    finally:
        svc.close()
