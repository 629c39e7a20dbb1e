"""Daemon parts without a daemon process: settings, token and lock, adapter versions, archives,
the SuperNode supervisor's back-off, the privacy file."""

from __future__ import annotations

import io
import json
import os
import random
import stat
import sys
import tarfile
import time
from pathlib import Path

import pytest

from client import archive as arc
from client.daemon import DaemonLocked, acquire_lock, bind_socket, ensure_token, release_lock
from client.supernode import (Supervisor, child_env, next_delay, read_privacy, supernode_command,
                               supernode_supervisor)
from client.items import ItemError, parse_items
from client.personal import PersonalAdapters
from shared.adapters import AdapterManifest, verify_adapter_dir
from client.settings import DaemonSpec, load_daemon
from shared.records import HistoryItem
from shared.tasks import get_task
from waiting import wait_for

# ------------------------------------------------------------------------------- settings


def test_daemon_spec_validates_with_field_names(tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text('task = "synthetic-tag"\nport = 0\n[base_model]\nquantization = "none"\n[personal_train]\nepochs = 1\n')
    spec = load_daemon(cfg, ["retrain_after=20"])
    assert (spec.task, spec.port, spec.retrain_after, spec.base_model.quantization) == ("synthetic-tag", 0, 20, "none")
    assert spec.personal_train.epochs == 1
    for bad, needle in [('host="0.0.0.0"', "daemon.host"), ('task="nope"', "daemon.task"),
                        ('coordinator="no-port"', "daemon.coordinator"), ("keep_versions=0", "daemon.keep_versions"),
                        ("train_nice=40", "daemon.train_nice"), ('retrieval.store="memory"', "retrieval.store"),
                        ("bogus=1", "unknown setting bogus")]:
        with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
            load_daemon(None, [bad])
    assert DaemonSpec(host="::1").host == "::1"


def test_token_is_owner_only_and_retightened(tmp_path):
    token = ensure_token(tmp_path)
    path = tmp_path / "token"
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)
    assert ensure_token(tmp_path) == token  # same token, permissions fixed
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_second_lock_names_the_holder_pid(tmp_path):
    fd = acquire_lock(tmp_path)
    try:
        with pytest.raises(DaemonLocked, match=f"pid {os.getpid()}"):
            acquire_lock(tmp_path)
    finally:
        release_lock(fd)
    release_lock(acquire_lock(tmp_path))  # free again


def test_api_socket_is_loopback_only():
    with pytest.raises(ValueError, match="loopback"):
        bind_socket("0.0.0.0", 0)
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


# ------------------------------------------------------------------------------- items


def test_items_are_checked_against_the_task_schema():
    task = get_task("synthetic-tag")
    good = {"id": "a", "fields": {"description": "a film", "tag": "comedy"}, "time": 3}
    assert parse_items([good], task, max_field_chars=100)[0] == HistoryItem("a", {"description": "a film", "tag": "comedy"}, 3)
    cases = [
        ({"id": "a", "fields": {"description": "x"}}, "tag"),
        ({"id": "a", "fields": {"description": "x", "tag": "horror"}}, "tag"),
        ({"id": "a", "fields": {"description": "x", "tag": 3}}, "tag"),
        ({"id": "a", "fields": {"description": "  ", "tag": "comedy"}}, "description"),
        ({"id": "", "fields": {"description": "x", "tag": "comedy"}}, "id"),
        ({"id": "a\n", "fields": {"description": "x", "tag": "comedy"}}, "id"),
        ({"id": "a", "fields": {"description": "x", "tag": "comedy"}, "time": -1}, "time"),
        ({"id": "a", "fields": {"description": "x", "tag": "comedy"}, "extra": 1}, "extra"),
        ({"id": "a", "fields": {"description": "x" * 101, "tag": "comedy"}}, "description"),
    ]
    for obj, field in cases:
        with pytest.raises(ItemError) as e:
            parse_items([good, obj], task, max_field_chars=100)
        assert e.value.loc[:2] == ("items", 1) and field in e.value.loc, (obj, e.value.loc)


# ------------------------------------------------------------------------------- personal adapter versions


def _save(engine, manifest_task="synthetic-tag"):
    def save(target: Path) -> None:
        engine.save_personal(target, AdapterManifest(role="personal", base_model_hash=engine.model_hash,
                                                     task=manifest_task, peft_type="lora", data={"history_items": 1}))
    return save


def test_personal_versions_keep_last_n_and_recover(tiny_engine, tmp_path):
    tiny_engine.reset_personal()
    pa = PersonalAdapters(tmp_path / "personal", keep=2)
    assert pa.resolve()[0] is None
    assert [pa.publish(_save(tiny_engine)) for _ in range(3)] == [1, 2, 3]
    assert pa.versions() == [2, 3] and pa.current_version() == 3
    # A crash between writing v4 and pointing CURRENT at it, plus a half-written temp dir:
    _save(tiny_engine)(pa.path(4))
    (pa.root / ".v000005.tmp-abc").mkdir()
    removed = pa.recover()
    assert set(removed) == {"v000004", ".v000005.tmp-abc"} and pa.versions() == [2, 3]
    assert pa.publish(_save(tiny_engine)) == 4  # the unpublished v4 was never seen by anyone
    # A damaged current version: the next older verified one answers, and the problem is told.
    weights = pa.path(4) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    found, problems = pa.resolve(base_model_hash=tiny_engine.model_hash)
    assert found.version == 3 and "v000004" in problems[0] and "sha256" in problems[0]
    assert pa.forget() == ["v000003", "v000004"] and pa.versions() == [] and pa.current_version() is None


# ------------------------------------------------------------------------------- archives


def _items(n=3):
    return [HistoryItem(f"i{j}", {"description": f"film {j}", "tag": "comedy"}, j) for j in range(n)]


def test_archive_round_trip(tiny_engine, tmp_path):
    pa = PersonalAdapters(tmp_path / "personal")
    v = pa.publish(_save(tiny_engine))
    out = tmp_path / "x.tar.gz"
    m = arc.write_archive(out, task="synthetic-tag", base_model_hash="h", items=_items(), profile="likes comedy",
                          adapter_dir=pa.path(v), personal_version=v)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and m["history_items"] == 3
    a = arc.read_archive(out, tmp_path / "work", max_bytes=1 << 30, task="synthetic-tag")
    try:
        assert a.profile == "likes comedy" and len(a.history) == 3 and a.history[0]["id"] == "i0"
        verify_adapter_dir(a.adapter_dir, base_model_hash=tiny_engine.model_hash)
    finally:
        a.cleanup()
    assert not a.directory.exists()


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _manifest(files: dict[str, bytes], **over) -> bytes:
    m = {"format": "oppu-export", "format_version": 1, "task": "synthetic-tag", "base_model_hash": "h",
         "history_items": 1, "files": {k: arc.sha256_bytes(v) for k, v in files.items()}}
    m.update(over)
    return json.dumps(m).encode()


HIST = json.dumps({"id": "a", "fields": {"description": "x", "tag": "comedy"}, "time": 0}).encode() + b"\n"


@pytest.mark.parametrize("case", ["traversal", "absolute", "symlink", "hardlink", "device", "pickle", "oversized",
                                  "no-manifest", "wrong-format", "wrong-task", "hash-mismatch", "unlisted",
                                  "duplicate", "not-a-tar", "count-mismatch", "incomplete-adapter"])
def test_archive_import_refusals(tmp_path, case):
    ok = {"history.jsonl": HIST}
    members: list = [_file("oppu-export.json", _manifest(ok)), _file("history.jsonl", HIST)]
    if case == "traversal":
        members.append(_file("../evil.txt", b"x"))
    elif case == "absolute":
        members.append(_file("/etc/evil", b"x"))
    elif case in ("symlink", "hardlink", "device"):
        info = tarfile.TarInfo("personal/adapter_model.safetensors")
        info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE}[case]
        info.linkname = "/etc/passwd"
        members.append((info, None))
    elif case == "pickle":
        members.append(_file("personal/adapter_model.bin", b"\x80\x04K\x01."))
    elif case == "oversized":
        members[1] = _file("history.jsonl", HIST + b" " * 5000)
    elif case == "no-manifest":
        members = members[1:]
    elif case == "wrong-format":
        members[0] = _file("oppu-export.json", _manifest(ok, format="zip"))
    elif case == "wrong-task":
        members[0] = _file("oppu-export.json", _manifest(ok, task="amazon-rating"))
    elif case == "hash-mismatch":
        members[1] = _file("history.jsonl", HIST.replace(b"comedy", b"action"))
    elif case == "unlisted":
        members.append(_file("profile.json", b'{"profile": "x"}'))
    elif case == "duplicate":
        members.append(_file("history.jsonl", HIST))
    elif case == "count-mismatch":
        members[0] = _file("oppu-export.json", _manifest(ok, history_items=2))
    elif case == "incomplete-adapter":
        cfg = b"{}"
        members[0] = _file("oppu-export.json", _manifest({**ok, "personal/adapter_config.json": cfg}))
        members.append(_file("personal/adapter_config.json", cfg))
    path = tmp_path / "a.tar.gz"
    if case == "not-a-tar":
        path.write_bytes(b"PK\x03\x04 definitely not a tar")
    else:
        _tar(path, members)
    work = tmp_path / "work"
    with pytest.raises(arc.ArchiveError):
        arc.read_archive(path, work, max_bytes=4000 if case == "oversized" else 1 << 20, task="synthetic-tag")
    assert not (tmp_path / "evil.txt").exists()
    assert list(work.iterdir()) == []  # nothing left behind



def test_archive_history_line_that_is_not_json_is_named(tmp_path):
    """The export's history is read by shared.jsonl.json_lines: the member, the line and the column."""
    bad = HIST + b'{"id": "b", "fields": \n'
    path = _tar(tmp_path / "a.tar.gz", [_file("oppu-export.json", _manifest({"history.jsonl": bad}, history_items=2)),
                                         _file("history.jsonl", bad)])
    with pytest.raises(arc.ArchiveError, match=r"^history\.jsonl: line 2: not valid JSON \(Expecting value, column 23\)$"):
        arc.read_archive(path, tmp_path / "work", max_bytes=1 << 20, task="synthetic-tag")


# ------------------------------------------------------------------------------- federation membership


def test_supernode_command_and_environment(tmp_path):
    cmd = supernode_command("flower-supernode", "127.0.0.1:9092", tmp_path, port=45678, insecure=True)
    assert cmd[1:] == ["--insecure", "--isolation", "subprocess", "--superlink", "127.0.0.1:9092", "--node-config",
                       f"data-dir='{tmp_path.resolve()}'", "--host", "127.0.0.1", "--port", "45678",
                       "--max-retries", "3", "--max-wait-time", "60.0"]
    assert cmd[0].endswith("flower-supernode")
    env = child_env()
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    with pytest.raises(ValueError, match="quote"):
        supernode_command("flower-supernode", "127.0.0.1:9092", tmp_path / "it's", port=1, insecure=True)
    with pytest.raises(ValueError, match="HOST:PORT"):
        supernode_supervisor("nowhere", tmp_path, insecure=True)


def test_backoff_grows_and_is_capped():
    rng = random.Random(0)
    delays = [next_delay(n, 1.0, 30.0, rng) for n in range(1, 9)]
    assert all(0.8 * min(30, 2 ** (n - 1)) <= d <= min(30, 1.2 * 2 ** (n - 1)) for n, d in zip(range(1, 9), delays))
    assert delays[-1] <= 30.0


def test_supervisor_restarts_a_failing_child_with_backoff_without_blocking(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('cannot reach superlink'); sys.exit(3)"]
    sup = Supervisor(lambda: cmd, name="fake-node", log_path=tmp_path / "logs" / "node.log",
                     initial=0.05, maximum=0.4, stable_after=60)
    t0 = time.monotonic()
    sup.start()
    assert time.monotonic() - t0 < 0.5  # start() returns at once
    wait_for(lambda: sup.starts >= 4, 20, "four starts")
    sup.stop()
    st = sup.status()
    assert sup.starts >= 4 and st["last_error"] == "exited with code 3" and st["state"] == "stopped"
    d = sup.delays
    assert d[1] > d[0] * 1.3 and max(d) <= 0.4  # doubling (with jitter), capped
    assert "cannot reach superlink" in (tmp_path / "logs" / "node.log").read_text()


def test_supervisor_stop_kills_a_running_child(tmp_path):
    sup = Supervisor(lambda: [sys.executable, "-c", "import time; time.sleep(60)"], name="sleeper",
                     log_path=tmp_path / "s.log", initial=0.05, maximum=0.1)
    sup.start()
    wait_for(lambda: sup.status()["pid"] is not None, 10, "the child to start")
    pid = sup.status()["pid"]
    t0 = time.monotonic()
    sup.stop(timeout=5)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_privacy_file_contract(tmp_path):
    assert read_privacy(tmp_path) == {"rounds": 0, "epsilon": None, "delta": None, "updated": None}
    (tmp_path / "federation.json").write_text(json.dumps({"rounds": 3, "epsilon": 1.25, "delta": 1e-5, "updated": 5}))
    assert read_privacy(tmp_path) == {"rounds": 3, "epsilon": 1.25, "delta": 1e-5, "updated": 5.0}
    (tmp_path / "federation.json").write_text(json.dumps({"rounds": "many", "epsilon": -1}))
    bad = read_privacy(tmp_path)
    assert bad["rounds"] == 0 and bad["epsilon"] is None and "error" in bad
    (tmp_path / "federation.json").write_text("{not json")
    assert "unreadable" in read_privacy(tmp_path)["error"]


def test_items_with_invalid_unicode_or_nul_are_refused():
    task = get_task("synthetic-tag")
    for bad in ({"id": "a", "fields": {"description": "x\ud800", "tag": "comedy"}},
                {"id": "a", "fields": {"description": "x\x00y", "tag": "comedy"}},
                {"id": "a\ud800", "fields": {"description": "x", "tag": "comedy"}}):
        with pytest.raises(ItemError):
            parse_items([bad], task, max_field_chars=100)
