"""A real `oppu client daemon` process on a free loopback port, driven over HTTP.

The daemon runs the tiny random Llama (real tokenizer) so a full add -> ask -> train -> ask cycle
takes seconds; every process a test starts is stopped by its PID in a finally block.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from shared.adapters import verify_adapter_dir
from shared.data.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = [
    {"description": "In a small coastal town, a chess player finds life upended when a letter arrives, "
                    "and choices must be made in this funny film."},
    {"description": "In a mountain hotel, two brothers find life upended when the power goes out in this magical film."},
    {"description": "In a rainy suburb, a taxi driver finds life upended when a storm hits in this tender film."},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_items(n: int, seed: int) -> list[dict]:
    user = make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=n, n_queries=1,
                          seed=seed).eval_users[0]
    return [{"id": it.id, "fields": dict(it.fields), "time": it.time} for it in user.history]


class DaemonProcess:
    """One daemon subprocess for a data directory; `stop` ends it by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, data_dir: Path, model_dir: Path, **settings: object) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        lines = ['task = "synthetic-tag"', "retrain_after = 0", "keep_versions = 2"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        lines += ["[base_model]", f"path = {json.dumps(str(model_dir))}", 'quantization = "none"', "threads = 1",
                  "[personal_train]", "epochs = 2", "lr = 0.02",
                  # Versions and publication are under test, on a random tiny model: every job adopts.
                  "[selection]", "enabled = false",
                  # A base adapter trained at start would hold the model while these tests ask and train;
                  # the built-in one is tested by tests/client/test_base_adapter_choice.py.
                  "[builtin_base]", 'when_missing = "untrained"']
        self.config = self.dir / "daemon.toml"  # where the daemon (and the ClientApp) look by default
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None
        self.log = self.dir.parent / f"{self.dir.name}.out"

    def start(self, *, wait: bool = True) -> DaemonProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False",
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oppu", "client", "daemon", "--data-dir", str(self.dir),
                 "--port", str(self.port)],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                info = json.loads((self.dir / "daemon.json").read_text())
                if info["pid"] == self.proc.pid and self.get("/v1/status").status_code == 200:
                    assert info["port"] == self.port and info["url"] == f"http://127.0.0.1:{self.port}"
                    return
            except (FileNotFoundError, ValueError, KeyError, httpx.TransportError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"daemon not ready after {timeout}s:\n{self.output()[-3000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": "Bearer " + (self.dir / "token").read_text().strip()}

    def get(self, path: str, headers: dict | None = None, **kw) -> httpx.Response:
        return httpx.get(self.url + path, headers={**self.headers(), **(headers or {})}, timeout=120, **kw)

    def post(self, path: str, headers: dict | None = None, **kw) -> httpx.Response:
        return httpx.post(self.url + path, headers={**self.headers(), **(headers or {})}, timeout=120, **kw)

    def ok(self, method: str, path: str, **kw) -> dict:
        r = getattr(self, method)(path, **kw)
        assert r.status_code < 300, (r.status_code, r.text)
        return r.json()

    def wait_job(self, job_id: str, timeout: float = 120) -> tuple[dict, list[tuple[int, int]]]:
        """Poll a job until it ends; returns it and the (steps_done, steps_total) seen on the way."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.ok("get", f"/v1/jobs/{job_id}")
            seen.append((job["steps_done"], job["steps_total"]))
            if job["state"] not in ("queued", "running"):
                return job, seen
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} still running after {timeout}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"daemon ignored signal {sig} for {timeout}s:\n{self.output()[-3000:]}") from None


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("daemon") / "data", tiny_model_dir)
    try:
        yield d.start()
    finally:
        d.stop()


def test_daemon_requires_token_and_serves_openapi(daemon):
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic abc"}):
        r = httpx.get(daemon.url + "/v1/status", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.post(daemon.url + "/v1/history", headers=headers, json={"items": []}).status_code == 401
    schema = httpx.get(daemon.url + "/openapi.json").json()
    assert {"/v1/history", "/v1/history/search", "/v1/ask", "/v1/train", "/v1/jobs/{job_id}",
            "/v1/jobs/{job_id}/cancel", "/v1/status", "/v1/export", "/v1/import", "/v1/forget"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    # A page that rebinds its DNS name to 127.0.0.1 is refused by Host.
    assert httpx.get(daemon.url + "/v1/status", headers={**daemon.headers(), "Host": "evil.example"}).status_code == 400
    token = daemon.dir / "token"
    assert oct(token.stat().st_mode & 0o777) == "0o600"


def test_daemon_add_ask_train_ask(daemon, capsys):
    items = synthetic_items(200, seed=7)
    t0 = time.perf_counter()
    res = daemon.ok("post", "/v1/history", json={"items": items})
    add_s = time.perf_counter() - t0
    assert (res["added"], res["skipped"], res["history_count"]) == (200, 0, 200)
    assert daemon.ok("post", "/v1/history", json={"items": items[:50]})["skipped"] == 50  # idempotent by id
    found = daemon.ok("get", "/v1/history/search", params={"q": items[3]["fields"]["description"], "k": 3})
    assert found["retriever"] == "bm25" and found["items"][0]["id"] == items[3]["id"]

    before = daemon.ok("post", "/v1/ask", json={"fields": QUESTIONS[0]})
    assert before["personal_version"] is None and before["method"] == "RAG" and len(before["retrieved"]) == 1

    job = daemon.ok("post", "/v1/train", json={})
    assert daemon.post("/v1/train", json={}).status_code == 409  # one job at a time
    job, seen = daemon.wait_job(job["id"])
    assert job["state"] == "succeeded", job
    assert job["steps_total"] == 100 and job["steps_done"] == 100 and job["loss"] is not None
    progress = [s for s, t in seen if t]
    assert progress == sorted(progress) and len(set(progress)) >= 2, seen  # watched it move
    assert job["result"]["version"] == 1 and job["result"]["examples"] == 200

    latencies = []
    for q in QUESTIONS * 3:
        t0 = time.perf_counter()
        after = daemon.ok("post", "/v1/ask", json={"fields": q})
        latencies.append(time.perf_counter() - t0)
        assert after["personal_version"] == 1 and after["method"] == "OPPU+RAG"
    no_personal = daemon.ok("post", "/v1/ask", json={"fields": QUESTIONS[0], "personal": False})
    assert no_personal["personal_version"] is None
    first = daemon.ok("post", "/v1/ask", json={"fields": QUESTIONS[0]})
    assert first["answer"] != no_personal["answer"]  # the personal adapter changes the answer

    status = daemon.ok("get", "/v1/status")
    assert status["personal_adapter"]["version"] == 1 and status["personal_adapter"]["data"]["history_items"] == 200
    derived = status["history"].pop("derived_files")  # what forget would delete
    assert status["history"] == {"count": 200, "new_since_training": 0, "retrain_after": 0}
    assert {"personal/CURRENT", "personal/v000001/adapter_model.safetensors", f"jobs/{job['id']}.json"} <= set(derived)
    assert status["base_model"]["hash"] and status["base_adapter"]["version"] == "untrained"
    assert status["privacy"]["rounds"] == 0 and status["federation"] is None
    verify_adapter_dir(Path(status["personal_adapter"]["path"]), base_model_hash=status["base_model"]["hash"])
    with capsys.disabled():
        print(f"\n[daemon figures] add 200 items: {add_s:.2f}s; train 200 items x 2 epochs "
              f"({job['steps_total']} steps): {job['finished'] - job['started']:.2f}s "
              f"(loop {job['result']['seconds']:.2f}s); ask over HTTP: median "
              f"{statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")


def _count(daemon) -> int:
    return daemon.ok("get", "/v1/status")["history"]["count"]


def test_daemon_refuses_malformed_items_and_stores_nothing(daemon):
    good = synthetic_items(5, seed=99)
    existing = synthetic_items(1, seed=98)[0]
    daemon.ok("post", "/v1/history", json={"items": [existing]})
    n = _count(daemon)
    cases = [
        ({"id": "x1", "fields": {"description": "a film"}}, ["items", 3, "fields", "tag"]),
        ({"id": "x1", "fields": {"description": "a film", "tag": "horror"}}, ["items", 3, "fields", "tag"]),
        ({"id": "x1", "fields": {"description": "a film", "tag": 5}}, ["items", 3, "fields", "tag"]),
        ({"id": "x1", "fields": {"description": "", "tag": "comedy"}}, ["items", 3, "fields", "description"]),
        ({"id": "", "fields": {"description": "a film", "tag": "comedy"}}, ["items", 3, "id"]),
        ({"id": "x1", "fields": {"description": "a film", "tag": "comedy"}, "time": "yesterday"}, ["items", 3, "time"]),
        ({"id": "x1", "fields": {"description": "a film", "tag": "comedy"}, "colour": "red"}, ["items", 3, "colour"]),
        ({"id": "x1", "fields": {"description": "a" * 20001, "tag": "comedy"}}, ["items", 3, "fields", "description"]),
    ]
    for bad, loc in cases:
        batch = good[:3] + [bad] + good[3:]
        r = daemon.post("/v1/history", json={"items": batch})
        assert r.status_code == 422, (bad, r.text)
        detail = r.json()["detail"][0]
        assert detail["loc"][: len(loc) + 1] == ["body", *loc], (bad, detail)
        assert _count(daemon) == n
    for body in ({"items": []}, {"itemz": good}, {"items": "nope"}, [1, 2]):
        assert daemon.post("/v1/history", json=body).status_code == 422
    assert daemon.post("/v1/history", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
    # The same id with other content is a conflict for the whole batch.
    clash = {**existing, "fields": {**existing["fields"], "tag": "action" if existing["fields"]["tag"] != "action" else "comedy"}}
    r = daemon.post("/v1/history", json={"items": good + [clash]})
    assert r.status_code == 409 and existing["id"] in r.json()["detail"]
    assert _count(daemon) == n
    big = b'{"items": [' + b" " * (33 << 20) + b"]}"
    assert daemon.post("/v1/history", content=big, headers={"Content-Type": "application/json"}).status_code == 413

    def chunked():  # no Content-Length: counted while it streams
        yield b'{"items": ['
        for _ in range(34):
            yield b" " * (1 << 20)

    assert daemon.post("/v1/history", content=chunked(), headers={"Content-Type": "application/json"}).status_code == 413
    # Asking and training validate too.
    assert daemon.post("/v1/ask", json={}).status_code == 422
    assert daemon.post("/v1/ask", json={"input": "x", "fields": {"description": "y"}}).status_code == 422
    r = daemon.post("/v1/ask", json={"fields": {"tag": "comedy"}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "fields", "description"]
    assert daemon.post("/v1/train", json={"epochs": -1}).status_code == 422
    assert daemon.post("/v1/train", json={"learning_rate": 1}).status_code == 422
    assert daemon.get("/v1/jobs/nope").status_code == 404
    assert daemon.post("/v1/forget", json={"confirm": False}).status_code == 422
    assert _count(daemon) == n


def test_daemon_export_forget_import_restores_answers(daemon, tmp_path):
    if daemon.ok("get", "/v1/status")["personal_adapter"] is None:
        daemon.ok("post", "/v1/history", json={"items": synthetic_items(200, seed=7)})
        daemon.wait_job(daemon.ok("post", "/v1/train", json={})["id"])
    before = [daemon.ok("post", "/v1/ask", json={"fields": q}) for q in QUESTIONS]
    status = daemon.ok("get", "/v1/status")
    n, version = status["history"]["count"], status["personal_adapter"]["version"]

    r = daemon.get("/v1/export")
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    archive = tmp_path / "me.tar.gz"
    archive.write_bytes(r.content)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"oppu-export.json", "history.jsonl", "personal/adapter_model.safetensors",
            "personal/oppu_adapter.json", "personal/adapter_config.json"} <= names

    gone = daemon.ok("post", "/v1/forget", json={"confirm": True})["deleted"]
    assert gone["history_items"] == n and f"v{version:06d}" in gone["adapter_versions"]
    assert gone["job_records"] >= 1
    after_forget = daemon.ok("get", "/v1/status")
    assert after_forget["history"]["count"] == 0 and after_forget["personal_adapter"] is None
    assert after_forget["personal_versions"] == [] and after_forget["history"]["derived_files"] == []
    assert daemon.ok("post", "/v1/ask", json={"fields": QUESTIONS[0]})["personal_version"] is None
    assert list((daemon.dir / "personal").glob("v*")) == []

    res = daemon.ok("post", "/v1/import", content=archive.read_bytes(), headers={"Content-Type": "application/gzip"})
    assert res["history_added"] == n and res["archive_personal_version"] == version
    after = [daemon.ok("post", "/v1/ask", json={"fields": q}) for q in QUESTIONS]
    assert [a["answer"] for a in after] == [b["answer"] for b in before]
    assert [a["retrieved"] for a in after] == [b["retrieved"] for b in before]
    assert {a["personal_version"] for a in after} == {res["personal_version"]}
    # Importing the same archive again changes nothing in the history (ids are idempotent).
    again = daemon.ok("post", "/v1/import", content=archive.read_bytes())
    assert again["history_added"] == 0 and again["history_skipped"] == n
    # A damaged archive is refused and nothing changes.
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    r = daemon.post("/v1/import", content=bytes(data))
    assert r.status_code == 422 and "nothing was changed" in r.json()["detail"]
    assert _count(daemon) == n


def _cli(daemon, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "oppu", "client", *args, "--data-dir", str(daemon.dir)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def test_daemon_cli_commands(daemon, tmp_path):
    flat = tmp_path / "profile.jsonl"  # LaMP-style flat items are accepted by `add`
    flat.write_text("".join(json.dumps({"id": f"cli-{i}", "description": f"A quiet clerk in film {i}",
                                        "tag": "romance", "date": str(1000 + i)}) + "\n" for i in range(10)))
    assert "added 10" in _cli(daemon, "add", str(flat)).stdout
    assert "cli-3" in _cli(daemon, "search", "quiet clerk film 3", "-k", "2").stdout
    trained = _cli(daemon, "train", "--epochs", "1")
    assert "published" in trained.stdout and "step" in trained.stderr  # the progress bar
    asked = _cli(daemon, "ask", "--field", "description=A quiet clerk in a film")
    assert "personal v" in asked.stderr
    status = _cli(daemon, "status").stdout
    assert "base model" in status and "history" in status and "privacy spent" in status
    archive = tmp_path / "cli.tar.gz"
    _cli(daemon, "export", str(archive))
    n = daemon.ok("get", "/v1/status")["history"]["count"]
    assert f"deleted {n} history items" in _cli(daemon, "forget", "--yes").stdout
    assert f"imported {n} new history items" in _cli(daemon, "import", str(archive)).stdout
    r = subprocess.run([sys.executable, "-m", "oppu", "client", "status", "--data-dir", str(tmp_path / "none")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no daemon is running" in r.stderr


def test_daemon_second_instance_refused_naming_pid(daemon):
    r = subprocess.run(
        [sys.executable, "-m", "oppu", "client", "daemon", "--data-dir", str(daemon.dir), "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"pid {daemon.proc.pid}" in r.stderr, r.stderr
    assert daemon.get("/v1/status").status_code == 200  # the first one is unaffected


def test_daemon_sigkill_during_training_then_restart(tiny_model_dir, tmp_path):
    d = DaemonProcess(tmp_path / "data", tiny_model_dir)
    try:
        d.start()
        d.ok("post", "/v1/history", json={"items": synthetic_items(60, seed=11)})
        first, _ = d.wait_job(d.ok("post", "/v1/train", json={"epochs": 1})["id"])
        assert first["state"] == "succeeded" and first["result"]["version"] == 1
        v1_answer = d.ok("post", "/v1/ask", json={"fields": QUESTIONS[1]})["answer"]

        long_job = d.ok("post", "/v1/train", json={"epochs": 100})
        deadline = time.monotonic() + 60
        while d.ok("get", f"/v1/jobs/{long_job['id']}")["steps_done"] < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.2)  # let a progress record reach the disk
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)

        d.start()  # the kernel released the lock; the restart reports what was lost
        status = d.ok("get", "/v1/status")
        assert status["personal_adapter"]["version"] == 1 and status["personal_versions"] == ["v000001"]
        assert status["jobs"]["interrupted_at_start"] == [long_job["id"]]
        job = d.ok("get", f"/v1/jobs/{long_job['id']}")
        assert job["state"] == "interrupted" and job["steps_done"] >= 20 and "interrupted" in job["error"]
        verify_adapter_dir(d.dir / "personal" / "v000001", base_model_hash=status["base_model"]["hash"])
        again = d.ok("post", "/v1/ask", json={"fields": QUESTIONS[1]})
        assert again["personal_version"] == 1 and again["answer"] == v1_answer

        # SIGTERM while training: a graceful stop that cancels the job and keeps v1.
        running = d.ok("post", "/v1/train", json={"epochs": 100})
        while d.ok("get", f"/v1/jobs/{running['id']}")["steps_done"] < 5:
            time.sleep(0.05)
        t0 = time.monotonic()
        assert d.stop(signal.SIGTERM) == 0
        assert time.monotonic() - t0 < 15
        assert not (d.dir / "daemon.json").exists()
        record = json.loads((d.dir / "jobs" / f"{running['id']}.json").read_text())
        assert record["state"] == "cancelled"
        assert (d.dir / "personal" / "CURRENT").read_text().strip() == "v000001"
        assert "shutting down" in (d.dir / "logs" / "daemon.log").read_text()
    finally:
        d.stop(signal.SIGKILL)
