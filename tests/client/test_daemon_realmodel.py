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
