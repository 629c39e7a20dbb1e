"""The daemon's API over the real embedded SmolLM2-135M-Instruct (nf4): add, train, ask."""

from __future__ import annotations

import time

import pytest

from shared.config import TrainSpec

from client.settings import DaemonSpec
from shared.data.synthetic import make_synthetic

pytestmark = pytest.mark.realmodel


def test_daemon_api_on_the_real_model(real_engine, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from client.api import create_app
    from client.service import ClientService

    spec = DaemonSpec(task="synthetic-tag", retrain_after=0,
                      personal_train=TrainSpec(epochs=1, lr=1e-3, batch_size=4, max_length=256))
    svc = ClientService(spec, tmp_path / "dir", engine=real_engine)
    auth = {"Authorization": "Bearer " + "t" * 43}
    try:
        with TestClient(create_app(svc, "t" * 43), base_url="http://127.0.0.1") as api:
            user = make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=24, n_queries=2,
                                  seed=8).eval_users[0]
            items = [{"id": it.id, "fields": dict(it.fields), "time": it.time} for it in user.history]
            assert api.post("/v1/history", json={"items": items}, headers=auth).json()["added"] == 24
            t0 = time.perf_counter()
            before = api.post("/v1/ask", json={"input": user.queries[0].input}, headers=auth).json()
            base_ask = time.perf_counter() - t0
            assert before["personal_version"] is None and before["answer"]
            job = api.post("/v1/train", json={}, headers=auth).json()
            done = svc.jobs.wait(job["id"], 300)
            assert done.state == "succeeded", done.error
            t0 = time.perf_counter()
            after = api.post("/v1/ask", json={"input": user.queries[0].input}, headers=auth).json()
            personal_ask = time.perf_counter() - t0
            # The job adopts its adapter only if it beat the base on the held-out items, and says so.
            assert isinstance(done.result["adopted"], bool) and done.result["selection"]
            assert after["personal_version"] == (1 if done.result["adopted"] else None)
            assert after["method"] == ("OPPU+RAG" if done.result["adopted"] else "RAG") and after["answer"]
            assert api.get("/v1/status", headers=auth).json()["base_model"]["quantization"] == real_engine.base.quantization
            with capsys.disabled():
                print(f"\n[daemon real model] ask {base_ask:.2f}s (no personal), {personal_ask:.2f}s (personal); "
                      f"train 24 items: {done.result['steps']} steps {done.result['seconds']:.1f}s, "
                      f"{done.result['selection']}; "
                      f"answer {after['answer']!r} (gold {user.queries[0].target!r})")
    finally:
        svc.close()
        real_engine.reset_personal()


@pytest.mark.slow
def test_a_fresh_daemons_first_answers_on_amazon_rating_parse_as_ratings(real_engine, tmp_path, capsys):
    """No coordinator, no base_adapter_dir, nothing cached: the daemon trains the built-in base
    adapter (the experiments' recipe on amazon-rating's base users) as a job at its start, and its
    first answers are ratings (issue 17). The cache is this test's own, so it always trains."""
    from client.service import ClientService
    from shared.config import BaseModelSpec
    from shared.data.amazon import build_amazon

    before = {k: v.detach().clone() for k, v in real_engine.base_state().items()}
    spec = DaemonSpec(task="amazon-rating", retrain_after=0,
                      base_model=BaseModelSpec(quantization=real_engine.base.quantization, cache_dir=str(tmp_path / "cache")))
    reviewer = build_amazon("amazon-rating", n_eval_users=1, n_base_users=0, n_queries=3).eval_users[0]
    t0 = time.perf_counter()
    svc = ClientService(spec, tmp_path / "dir", engine=real_engine)
    try:
        svc.add(reviewer.history)
        svc.start()
        job = svc.jobs.active()
        if job is not None:  # the first start's job; asking waits for it (the CLI shows its progress)
            done = svc.jobs.wait(job.id, 1200)
            assert done.state == "succeeded", done.error
        prepared = time.perf_counter() - t0
        answers = [svc.ask(q.input) for q in reviewer.queries]
        for a in answers:
            assert a["prediction"] in ("1", "2", "3", "4", "5"), a
            assert a["base_adapter_source"] == "builtin" and not a["warnings"], a
        with capsys.disabled():
            print(f"\n[built-in base adapter] {job.public()['steps_total'] if job else 0} steps, start to ready "
                  f"{prepared:.0f}s; answers {[a['answer'] for a in answers]} (gold {[q.target for q in reviewer.queries]})")
    finally:
        svc.close()
        real_engine.set_base_state(before)
