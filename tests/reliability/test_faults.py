"""Faults injected and survived. Each ends with zero acknowledged history items lost and the
previous personal adapter loadable (and answering as before).

- a real daemon process SIGKILLed while training, while saving an adapter (the save is slowed
  in that process only, by a wrapper that patches PEFT's safetensors writer, so the kill lands
  inside it; no hook exists in the daemon) and while clients are writing history;
- a full disk: during an adapter save (ENOSPC raised by the safetensors writer after half a file,
  in a running service), and during a history write on a data directory whose disk really fills
  (a small tmpfs in a private mount namespace: Chroma's SQLite write gets ENOSPC);
- the coordinator unreachable: in tests/reliability/test_load.py, during the whole load test;
- a client killed in the middle of a federated round, and the coordinator crashing mid-run and
  resuming from its checkpoint (in process, with the real ClientApp; the real-process SIGKILL
  variant of the coordinator is tests/coordinator/test_checkpoint_resume.py and the slow test
  below).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from shared.adapters import verify_adapter_dir

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "client"))
sys.path.insert(0, str(TESTS))

from test_daemon_process import QUESTIONS, REPO, DaemonProcess, synthetic_items  # noqa: E402
from waiting import wait_for  # noqa: E402

# The daemon, started through a wrapper that can make one adapter save hang half-written (only
# while DIR/hang-save exists) and says so in DIR/saving: the test's SIGKILL then lands mid-save.
WRAPPER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import peft.peft_model as pm
    data_dir = Path(sys.argv[sys.argv.index("--data-dir") + 1])
    real = pm.safe_save_file
    def save(tensors, filename, *a, **kw):
        if (data_dir / "hang-save").exists():
            with open(filename, "wb") as fh:          # half a file, as a crash would leave it
                fh.write(b"\\x00" * 1024)
                fh.flush(); os.fsync(fh.fileno())
            (data_dir / "saving").write_text(str(filename))
            time.sleep(600)
        return real(tensors, filename, *a, **kw)
    pm.safe_save_file = save
    from oppu.cli import main
    sys.exit(main(sys.argv[1:]))
""")


class WrappedDaemon(DaemonProcess):
    def start(self, *, wait: bool = True) -> WrappedDaemon:
        script = self.dir.parent / "daemon_wrapper.py"
        script.write_text(WRAPPER)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False",
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), "client", "daemon", "--data-dir", str(self.dir), "--port", str(self.port)],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()
        return self

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def stored_items(d: DaemonProcess) -> dict[str, dict]:
    out, offset = {}, 0
    while True:
        page = d.ok("get", "/v1/history", params={"offset": offset, "limit": 1000})
        for it in page["items"]:
            assert it["id"] not in out, f"duplicated item {it['id']}"
            out[it["id"]] = it
        offset += len(page["items"])
        if offset >= page["total"] or not page["items"]:
            return out


def check_acknowledged(d: DaemonProcess, acked: dict[str, dict]) -> int:
    """Every acknowledged item is stored with exactly its content; returns how many were lost."""
    have = stored_items(d)
    lost = [i for i in acked if i not in have]
    for i, it in acked.items():
        if i in have:
            assert have[i]["fields"] == it["fields"] and have[i]["time"] == it["time"], i
    return len(lost)


class Writers:
    """Clients adding unique items in small batches; remembers what the daemon acknowledged."""

    def __init__(self, d: DaemonProcess, n: int, prefix: str) -> None:
        self.d, self.n, self.prefix = d, n, prefix
        self.acked: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, w: int) -> None:
        pool = synthetic_items(400, seed=1000 + w)
        k = 0
        with httpx.Client(base_url=self.d.url, headers=self.d.headers(), timeout=30) as client:
            while not self.stop.is_set():
                batch = [{**it, "id": f"{self.prefix}-{w}-{k + j}"} for j, it in enumerate(pool[k % 380:k % 380 + 5])]
                k += len(batch)
                try:
                    r = client.post("/v1/history", json={"items": batch})
                except httpx.TransportError:
                    return  # the daemon is gone: nothing of this batch was acknowledged
                if r.status_code == 200:
                    with self.lock:
                        self.acked.update({it["id"]: it for it in batch})

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_daemon_killed_during_training_adapter_save_and_history_writes(tiny_model_dir, tmp_path, figures):
    d = WrappedDaemon(tmp_path / "data", tiny_model_dir)
    try:
        d.start()
        base = synthetic_items(40, seed=11)
        d.ok("post", "/v1/history", json={"items": base})
        acked = {it["id"]: it for it in base}
        job, _ = d.wait_job(d.ok("post", "/v1/train", json={"epochs": 1})["id"])
        assert job["state"] == "succeeded" and job["result"]["version"] == 1
        v1_answer = d.ok("post", "/v1/ask", json={"fields": QUESTIONS[1]})["answer"]
        model_hash = d.ok("get", "/v1/status")["base_model"]["hash"]

        def survived(fault: str, how: str, note: str = "") -> None:
            d.start()
            status = d.ok("get", "/v1/status")
            lost = check_acknowledged(d, acked)
            adapter_ok = (status["personal_adapter"]["version"] == 1 and status["personal_versions"] == ["v000001"]
                          and verify_adapter_dir(d.dir / "personal" / "v000001", base_model_hash=model_hash) is not None)
            answer = d.ok("post", "/v1/ask", json={"fields": QUESTIONS[1]})
            adapter_ok = adapter_ok and answer["personal_version"] == 1 and answer["answer"] == v1_answer
            leftovers = [p.name for p in (d.dir / "personal").iterdir() if p.name.startswith(".v")]
            figures.fault(fault, how=how, survived=lost == 0 and adapter_ok and not leftovers,
                          acknowledged=len(acked), lost=lost, adapter_ok=adapter_ok, note=note)
            assert lost == 0 and adapter_ok and not leftovers, (lost, status, leftovers)

        # 1. SIGKILL while training.
        long_job = d.ok("post", "/v1/train", json={"epochs": 100})
        wait_for(lambda: d.ok("get", f"/v1/jobs/{long_job['id']}")["steps_done"] >= 5, 60, "training to start")
        d.kill()
        survived("daemon killed during training", "SIGKILL after >= 5 training steps")
        assert d.ok("get", f"/v1/jobs/{long_job['id']}")["state"] == "interrupted"

        # 2. SIGKILL while the adapter is being written (half a safetensors file on disk).
        (d.dir / "hang-save").touch()
        d.ok("post", "/v1/train", json={"epochs": 1})
        wait_for(lambda: (d.dir / "saving").exists(), 120, "the adapter save to start")
        half = Path((d.dir / "saving").read_text())
        tmp_dir = next(p for p in half.parents if ".tmp-" in p.name)  # it was writing into a temp dir
        assert half.exists() and tmp_dir.parent == d.dir / "personal"
        d.kill()
        (d.dir / "hang-save").unlink()
        (d.dir / "saving").unlink()
        survived("daemon killed during an adapter save", "SIGKILL while the new version's weights were "
                 "half written", note=f"(left {tmp_dir.name}/; removed at restart)")
        assert not tmp_dir.exists()

        # 3. SIGKILL while 8 clients write history, at a random moment (more rounds: OPPU_SOAK=1).
        rng = random.Random(7)
        for attempt in range(5 if os.environ.get("OPPU_SOAK") == "1" else 1):
            with Writers(d, 8, f"w{attempt}") as writers:
                target = rng.randint(10, 60)  # kill after a random number of acknowledged items
                wait_for(lambda: len(writers.acked) >= target, 120, "writes to be acknowledged")
                time.sleep(rng.random() * 0.3)
                d.kill()
            acked.update(writers.acked)
            assert writers.acked, "no write was acknowledged before the kill"
            survived("daemon killed during history writes", f"SIGKILL at a random moment while 8 clients added "
                     f"5-item batches ({len(writers.acked)} items acknowledged before the kill)")
        # Items whose batch was in flight may be stored (then complete) or not: sending them again works.
        again = d.ok("post", "/v1/history", json={"items": list(acked.values())[:50]})
        assert again["added"] == 0 and again["skipped"] == 50
    finally:
        d.stop(signal.SIGKILL)


def test_disk_full_during_adapter_save(tiny_engine, tmp_path, monkeypatch, figures):
    import peft.peft_model as pm

    from client.service import ClientService
    from shared.config import SelectionSpec, TrainSpec
    from client.settings import DaemonSpec
    from shared.data.synthetic import make_synthetic

    spec = DaemonSpec(task="synthetic-tag", retrain_after=0, personal_train=TrainSpec(epochs=1, lr=2e-2, batch_size=4),
                      selection=SelectionSpec(enabled=False))  # publication under test: always adopt
    svc = ClientService(spec, tmp_path / "dir", engine=tiny_engine)
    try:
        user = make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=30, n_queries=2,
                              seed=21).eval_users[0]
        svc.add(user.history)
        assert svc.jobs.wait(svc.train().id, 120).state == "succeeded"
        v1 = svc.ask(user.queries[0].input)
        assert v1["personal_version"] == 1

        real = pm.safe_save_file

        def full(tensors, filename, *a, **kw):
            with open(filename, "wb") as fh:
                fh.write(b"\x00" * 512)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))

        monkeypatch.setattr(pm, "safe_save_file", full)
        job = svc.jobs.wait(svc.train().id, 120)
        assert job.state == "failed" and "No space left" in job.error
        monkeypatch.setattr(pm, "safe_save_file", real)
        names = sorted(p.name for p in (svc.dir / "personal").iterdir() if p.name != ".lock")
        assert names == ["CURRENT", "v000001"], names  # no partial version visible, no temp dir left
        after = svc.ask(user.queries[0].input)
        adapter_ok = after["personal_version"] == 1 and after["answer"] == v1["answer"]
        verify_adapter_dir(svc.dir / "personal" / "v000001", base_model_hash=tiny_engine.model_hash)
        figures.fault("disk full during an adapter save", how="ENOSPC raised by the safetensors writer after "
                      "512 bytes (in a running service)", survived=adapter_ok, acknowledged=len(user.history), lost=0,
                      adapter_ok=adapter_ok)
        assert adapter_ok

    finally:
        svc.close()
        tiny_engine.reset_personal()



# A data directory on a 8 MiB tmpfs of its own (a private mount namespace: `unshare -m`, or
# `unshare -rm` without root), filled to within FREE bytes: the history write runs into a real
# ENOSPC inside Chroma's SQLite write. The script reports what it saw; the test judges it.
DISK_FULL = textwrap.dedent("""
    import json, os, subprocess, sys
    from pathlib import Path
    mount, model, out, tests = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount)], check=True)
    sys.path[:0] = [tests + "/reliability", tests + "/client"]
    import stored_state
    from starlette.testclient import TestClient
    from client.api import create_app
    from client.service import ClientService
    from client.settings import DaemonSpec
    from shared.config import BaseModelSpec
    from shared.engine import Engine
    from test_daemon_process import synthetic_items

    svc = ClientService(DaemonSpec(task="synthetic-tag", retrain_after=0), mount / "dir",
                        engine=Engine(BaseModelSpec(path=model, quantization="none")))
    api = TestClient(create_app(svc, "k" * 43), base_url="http://127.0.0.1", raise_server_exceptions=False,
                     headers={"Authorization": "Bearer " + "k" * 43})
    seen = {}

    def _detail(r):  # the API answers JSON; an unhandled error is Starlette's plain-text 500
        try:
            return r.json().get("detail", "")
        except ValueError:
            return r.text[:300]

    def note(key, value):  # written as it goes: a hang later still leaves what was seen
        seen[key] = value
        out.write_text(json.dumps(seen))

    items = synthetic_items(70, seed=31)
    first = items[:30]
    batch = [{"id": it["id"], "fields": {**it["fields"], "description": it["fields"]["description"] * 8},
              "time": it["time"]} for it in items[30:]]
    note("first", api.post("/v1/history", json={"items": first}).status_code)
    before = stored_state.service(svc)
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(bytes(4096))
        except OSError as e:
            note("filled", e.errno)
    os.truncate(filler, filler.stat().st_size - int(os.environ["FREE"]))
    r = api.post("/v1/history", json={"items": batch})
    note("full", {"status": r.status_code, "detail": _detail(r)})
    note("changed", stored_state.differences(before, stored_state.service(svc)))
    filler.unlink()
    r = api.post("/v1/history", json={"items": batch})
    note("again", {"status": r.status_code, "body": r.json() if r.status_code == 200 else {"detail": _detail(r)}})
    stored = {it.id: dict(it.fields) for it in svc.store.items()}
    note("acknowledged_lost", [it["id"] for it in first if stored.get(it["id"]) != it["fields"]])
    note("batch_missing", [it["id"] for it in batch if stored.get(it["id"]) != it["fields"]])
    svc.close()
""")


def _private_mounts() -> list[str] | None:
    """The command that runs a process in a mount namespace of its own, where it may mount a
    tmpfs; None where this machine allows none (no unshare, no user namespaces)."""
    import shutil

    if not shutil.which("unshare"):
        return None
    cmd = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    probe = subprocess.run([*cmd, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True, timeout=30)
    return cmd if probe.returncode == 0 else None


@pytest.mark.slow  # a process loading the model, the embedder and Chroma: ~30 s
def test_disk_full_during_a_history_write(tiny_model_dir, tmp_path, figures):
    """POST /v1/history on a disk that really fills during the write (Chroma's SQLite gets ENOSPC):
    the batch is refused whole with 507 "the disk is full", nothing stored changes (snapshots of
    the data directory, the store's items and the adapter before and after), and the same batch
    sent once there is space again is stored."""
    unshare = _private_mounts()
    if unshare is None:
        pytest.skip("needs a private mount namespace (unshare) to give the store a small disk of its own")
    mount, out = tmp_path / "disk", tmp_path / "seen.json"
    mount.mkdir()
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL)
    env = {**os.environ, "PYTHONPATH": str(REPO), "FREE": str(16 << 10), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False", "TOKENIZERS_PARALLELISM": "false"}
    try:
        run = subprocess.run([*unshare, sys.executable, str(script), str(mount), str(tiny_model_dir), str(out),
                              str(TESTS)], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail("the service stopped answering after the disk-full write; what it had answered: "
                    + (out.read_text() if out.exists() else "nothing"))
    seen = json.loads(out.read_text()) if out.exists() else {}
    assert run.returncode == 0 and "batch_missing" in seen, (seen, run.stdout[-3000:] + run.stderr[-3000:])
    assert seen["first"] == 200 and seen["filled"] == errno.ENOSPC, seen
    refused_whole = seen["full"]["status"] == 507 and "disk is full" in seen["full"]["detail"]
    stored_again = seen["again"]["status"] == 200 and seen["again"]["body"]["added"] == 40 and not seen["batch_missing"]
    lost = len(seen["acknowledged_lost"])
    figures.fault("disk full during a history write", how="the data directory on an 8 MiB tmpfs filled to 16 KiB "
                  "free, then a 40-item batch posted: ENOSPC inside Chroma's SQLite write",
                  survived=refused_whole and not seen["changed"] and stored_again and lost == 0,
                  acknowledged=30, lost=lost, adapter_ok=None,
                  note=f"(answered {seen['full']['status']}: {seen['full']['detail']!r}; stored state changed: "
                       f"{seen['changed'] or 'nothing'}; sent again with space: {seen['again']['status']}, "
                       f"{seen['again']['body'].get('added')} added)")
    assert refused_whole, seen["full"]
    assert seen["changed"] == [], seen["changed"]
    assert lost == 0, seen
    assert stored_again, seen["again"]


def test_client_killed_mid_round_and_coordinator_crash_resumes(tiny_model_dir, tmp_path, figures):
    """Round 1: one client dies while training (its reply never comes: Flower reports an error for
    it). The round aggregates the others; then the coordinator itself crashes in round 2 and a new
    one resumes from the checkpoint of round 1, with the dead client back."""
    import inprocess_federation as fedkit

    from client.personal import PersonalAdapters
    from coordinator import checkpoint

    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "federation.rounds=2", "privacy.federate_base_adapter=true",
                            'methods=["OPPU"]', "federation.personal_refresh_epochs=0")
    _, names = fedkit.prepare(spec, run)
    grid = fedkit.local_grid(spec, run, names)
    victim = grid.get_node_ids()[0]
    victim_dir = run / "users" / names[0]
    state = {"round": 0}
    real_app = grid.client_app

    class Crash(BaseException):
        pass

    def app(msg, context):
        if msg.metadata.message_type == "train":
            rnd = int(msg.content["config"]["server-round"])
            state["round"] = rnd
            if rnd == 2:
                raise Crash("the coordinator's process dies in round 2")
            if rnd == 1 and context.node_id == victim:
                from flwr.app import Error, Message

                # The client process is killed mid-round: no reply; the link reports an error.
                return Message(Error(code=0, reason="node lost (process killed)"), reply_to=msg)
        return real_app(msg, context)

    grid.client_app = app
    with pytest.raises(Crash):
        fedkit.run(spec, run, grid)
    saved = checkpoint.load(run / "checkpoint")
    assert saved is not None and saved.round == 1
    r1 = saved.history[0]
    assert str(victim) in {**r1["failed"], **r1["rejected"]}, r1
    assert r1["aggregated"] == r1["sampled"] - 1 >= 1
    from client.userdir import UserDir

    personal_dir = UserDir(victim_dir).personal_root("plain")
    versions_before = PersonalAdapters(personal_dir).resolve()[0]
    grid2 = fedkit.local_grid(spec, run, names)
    summary = fedkit.run(spec, run, grid2)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][:1] == saved.history
    assert summary["rounds"][1]["aggregated"] == summary["rounds"][1]["sampled"]  # the client is back
    published = PersonalAdapters(personal_dir).resolve()[0]
    adapter_ok = published is not None and (versions_before is None or published.version >= versions_before.version)
    figures.fault("client killed mid-round", how="one of 3 clients lost during round 1's training (Flower error "
                  "reply in place of its update)", survived=r1["aggregated"] >= 1 and adapter_ok, acknowledged=0, lost=0,
                  adapter_ok=adapter_ok, note="(round 1 aggregated the others; the client rejoined in round 2)")
    figures.fault("coordinator crashed mid-run and restarted", how="exception out of the coordinator's process "
                  "during round 2; a new coordinator on the same run_dir", survived=True, acknowledged=0, lost=0,
                  adapter_ok=None, note="(resumed at round 2 from the round-1 checkpoint; round 1 identical; real "
                  "SIGKILLs: tests/coordinator/test_checkpoint_resume.py, slow test_coordinator_kill.py)")
