"""A user's data directory over its life: the API token is created whole or not at all; `forget`
removes everything derived from the history."""

from __future__ import annotations

import multiprocessing
import stat

import pytest

from client import daemon


def test_token_is_never_visible_empty_or_partial_to_a_racing_start(tmp_path, monkeypatch):
    """Between creating the token file and writing it, a second start (or the CLI) reading the
    token found an empty file and failed; now the file appears complete, mode 0600, or not at all."""
    seen: list = []
    real = daemon.secrets.token_urlsafe

    def token_while_another_start_reads(n):
        token = real(n)
        if not seen:  # the other starter runs at the moment this one is making its token
            seen.append("racing")
            try:
                seen.append(daemon.ensure_token(tmp_path))
            except RuntimeError as e:
                seen.append(e)
        return token

    monkeypatch.setattr(daemon.secrets, "token_urlsafe", token_while_another_start_reads)
    mine = daemon.ensure_token(tmp_path)
    assert seen[1] == mine, f"the racing start got {seen[1]!r}"  # both agree on one complete token
    path = tmp_path / "token"
    assert path.read_text() == mine + "\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["token"]


def _make_token(d):
    import os

    os.fsync = lambda fd: os._exit(3)  # power cut / SIGKILL after the data was written, before it was durable
    daemon.ensure_token(d)


def test_a_start_killed_while_creating_the_token_leaves_no_token(tmp_path):
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_make_token, args=(tmp_path,))
    p.start()
    p.join(30)
    assert p.exitcode == 3
    assert not (tmp_path / "token").exists()  # the next start creates a new one
    assert len(daemon.ensure_token(tmp_path)) >= 32


# ------------------------------------------------------------------------------- forget

MARK = "zebra-7f3c"  # in every item, so any file still quoting the history is found

# What may remain in a data directory after forget: settings and identity, the shared base
# adapter, the empty history store, privacy accounting, empty logs and lock files.
ALLOWED_AFTER_FORGET = ("state.json", "daemon.toml", "token", "daemon.lock", "daemon.json", "history/*",
                        "history/**/*", "base_adapter/*", "federation.json", "federation/record-privacy-*.json",
                        "logs/daemon.log", "logs/supernode.log", "*/.lock")


def _everything(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())


def test_forget_removes_every_file_derived_from_the_history(tiny_engine, tmp_path):
    """forget used to leave DIR/personal-<aug>/ adapters, DIR/federation/profile.txt (a summary
    of the history the model wrote) and logs quoting items."""
    import fnmatch
    import json

    from client.personal import PersonalAdapters
    from client.service import ClientService
    from client.settings import DaemonSpec
    from client.userdir import UserDir
    from shared.adapters import AdapterManifest
    from shared.records import HistoryItem

    spec = DaemonSpec(task="synthetic-tag", retrain_after=0, personal_adapter=tiny_engine.personal_adapter_spec)
    svc = ClientService(spec, tmp_path / "dir", engine=tiny_engine)
    d = svc.dir
    try:
        svc.add([HistoryItem(f"i{j}", {"description": f"{MARK} film {j}", "tag": "comedy"}, j) for j in range(5)])
        svc.store.set_profile(f"likes {MARK} films")

        def save(target):
            tiny_engine.save_personal(target, AdapterManifest(role="personal", base_model_hash=tiny_engine.model_hash,
                                                              task="synthetic-tag", peft_type="lora",
                                                              data={"history_items": 5}))

        svc.personal.publish(save)
        svc.host.load_published()
        for aug in ("pag", "plain"):  # what a federated round leaves for the other augmentations
            PersonalAdapters(d / f"personal-{aug}").publish(save)
            (d / "federation").mkdir(exist_ok=True)
            (d / "federation" / f"selection-{aug}.json").write_text(json.dumps({"adopted": True, "items": 5}))
        UserDir(d).cache_profile(f"The user likes {MARK} comedies.")
        (d / "federation" / "record-privacy-personal.json").write_text('{"steps": 3}')  # accounting: kept
        (d / "federation.json").write_text('{"rounds": 1, "epsilon": 0.5}')  # privacy spent: kept
        (d / "logs").mkdir()
        for name in ("daemon.log", "daemon.log.1", "supernode.log"):
            (d / "logs" / name).write_text(f"refused item {MARK} film 3\n")
        job = svc.jobs.submit("train", lambda ctl: {"steps": 0})
        svc.jobs.wait(job.id, 30)
        (d / "tmp").mkdir(exist_ok=True)
        (d / "tmp" / "export-abc.tar.gz").write_text(MARK)

        before = svc.status()["history"]["derived_files"]
        assert {"federation/profile.txt", "personal-pag/CURRENT", "logs/daemon.log.1", "tmp/export-abc.tar.gz",
                "history/history.profile.json", f"jobs/{job.id}.json"} <= set(before)

        res = svc.forget()
        left = _everything(d)
        derived = [f for f in left if not any(fnmatch.fnmatch(f, pat) for pat in ALLOWED_AFTER_FORGET)]
        assert derived == [], f"forget left {derived} (all: {left})"
        quoting = [f for f in left if MARK.encode() in (d / f).read_bytes()]
        assert quoting == [], f"files still quoting the history: {quoting}"
        assert svc.status()["history"]["derived_files"] == [] and svc.status()["history"]["count"] == 0
        assert "federation/profile.txt" in res["deleted"]["derived_files"]
        assert (d / "federation" / "record-privacy-personal.json").is_file() and (d / "federation.json").is_file()
        # A new history starts clean and works.
        svc.add([HistoryItem("n1", {"description": "new", "tag": "comedy"}, 1)])
        assert svc.count() == 1 and svc.host.published is None
    finally:
        svc.close()


def test_forget_stops_a_federated_round_before_deleting_and_restarts_the_node(tiny_engine, tmp_path):
    """A round under way has read the history; its ClientApp must not publish what it derived
    after forget. The SuperNode is stopped before anything is deleted, then started again."""
    from client.personal import PersonalAdapters
    from client.service import ClientService
    from client.settings import DaemonSpec
    from shared.adapters import AdapterManifest
    from shared.records import HistoryItem

    spec = DaemonSpec(task="synthetic-tag", retrain_after=0, personal_adapter=tiny_engine.personal_adapter_spec)
    svc = ClientService(spec, tmp_path / "dir", engine=tiny_engine)
    events: list = []

    class Node:  # the supervisor's interface, recording what the directory held at each call
        state = "running"

        def status(self):
            return {"state": self.state}

        def stop(self):
            events.append(("stop", (svc.dir / "personal-pag").exists(), svc.count()))
            self.state = "stopped"

        def start(self):
            events.append(("start", (svc.dir / "personal-pag").exists(), svc.count()))
            self.state = "running"

    try:
        svc.add([HistoryItem("i1", {"description": f"{MARK} film", "tag": "comedy"}, 1)])
        PersonalAdapters(svc.dir / "personal-pag").publish(lambda t: tiny_engine.save_personal(t, AdapterManifest(
            role="personal", base_model_hash=tiny_engine.model_hash, task="synthetic-tag", peft_type="lora")))
        svc.supervisor = Node()
        svc.forget()
        assert events == [("stop", True, 1), ("start", False, 0)]
    finally:
        svc.supervisor = None
        svc.close()
