"""The daemon's SuperNode never outlives it, holds the data-directory lock with it, and whatever a
killed daemon left running is stopped before the next one touches the directory (client/lifetime.py).

Every process a test starts is stopped by its PID in a finally block."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from client.daemon import DaemonLocked, acquire_lock, lock_data_dir, release_lock
from client.lifetime import MARKER_FILE, reap_orphans, start_time
from client.supernode import Supervisor
from waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc: Linux")

# A stand-in SuperNode: starts a child of its own (as flower-supernode starts flower-superexec)
# that does not watch its parent, records both PIDs next to this script, and sleeps.
FAKE_NODE = textwrap.dedent("""
    import os, subprocess, sys, time
    from pathlib import Path
    here = Path(__file__).parent
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    tmp = here / f".node-{os.getpid()}.tmp"
    tmp.write_text(f"{os.getpid()} {child.pid}")
    os.replace(tmp, here / f"node-{os.getpid()}.pids")
    time.sleep(300)
""")


def running(pid: int) -> bool:
    """A live process (a zombie awaiting its reaper is dead for this purpose)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def kill(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def fake_node(tmp_path: Path) -> Path:
    script = tmp_path / "fake_supernode.py"
    script.write_text(FAKE_NODE)
    return script


def node_pids(script: Path) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in p.read_text().split()) for p in sorted(script.parent.glob("node-*.pids"))]


def test_supernode_dies_with_a_killed_parent_and_its_group_is_reaped(tmp_path):
    """SIGKILL the process that supervises the node: the kernel kills the node at once; the node's
    own child (which does not watch its parent) survives until the next start reaps the recorded
    process group."""
    script = fake_node(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    parent_code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from client.supernode import Supervisor
        sup = Supervisor(lambda: [sys.executable, {str(script)!r}], name="node", log_path=Path({str(tmp_path)!r}) / "n.log",
                         marker_dir=Path({str(data)!r}))
        sup.start()
        time.sleep(300)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    pids: list[tuple[int, int]] = []
    try:
        wait_for(lambda: node_pids(script) and (data / MARKER_FILE).exists(), 30, "the node started")
        [(node, child)] = pids = node_pids(script)
        marker = json.loads((data / MARKER_FILE).read_text())
        assert marker["pgid"] == node and marker["daemon_pid"] == parent.pid
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not running(node), 5, f"SuperNode {node} died with its parent")
        assert running(child)  # an orphan of the node's group, still in the data directory's business
        assert child in reap_orphans(data)
        assert not running(child) and not (data / MARKER_FILE).exists()
        assert reap_orphans(data) == []  # nothing recorded any more
    finally:
        kill(parent.pid, *[p for pair in pids for p in pair])


def test_supernode_holds_the_data_dir_lock_while_it_runs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    fd = acquire_lock(data)
    sup = Supervisor(lambda: [sys.executable, "-c", "import time; time.sleep(300)"], name="node",
                     log_path=tmp_path / "n.log", pass_fds=(fd,), marker_dir=data)
    try:
        sup.start()
        wait_for(lambda: sup.status()["pid"] is not None, 20, "the node started")
        os.close(fd)  # as if the daemon were gone: the node's copy of the descriptor keeps the lock
        with pytest.raises(DaemonLocked):
            release_lock(acquire_lock(data))
        assert json.loads((data / MARKER_FILE).read_text())["pgid"] == sup.status()["pid"]
    finally:
        sup.stop(timeout=5)
    release_lock(acquire_lock(data))  # free once the node is gone
    assert not (data / MARKER_FILE).exists()


def _marker(data: Path, node: subprocess.Popen, daemon_pid: int, daemon_start: int | None, **over) -> None:
    record = {"pgid": node.pid, "leader_start": start_time(node.pid), "daemon_pid": daemon_pid,
              "daemon_start": daemon_start, **over}
    (data / MARKER_FILE).write_text(json.dumps(record))


def test_next_start_stops_an_orphan_node_that_holds_the_lock(tmp_path):
    """The node outlived its daemon (no parent-death signal, e.g. not Linux): it holds the lock, so
    the next daemon start stops it — its recorded daemon is gone — and then takes the lock."""
    data = tmp_path / "data"
    data.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    fd = acquire_lock(data)
    node = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True,
                            pass_fds=(fd,))
    try:
        _marker(data, node, gone.pid, 1)
        os.close(fd)  # the daemon died
        with pytest.raises(DaemonLocked):
            release_lock(acquire_lock(data))
        lock = lock_data_dir(data)
        try:
            assert node.wait(5) is not None and not (data / MARKER_FILE).exists()
        finally:
            release_lock(lock)
    finally:
        kill(node.pid)


def test_reaping_spares_a_live_daemons_node_and_a_reused_pid(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    node = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        wait_for(lambda: start_time(daemon.pid) is not None, 5, "started")
        _marker(data, node, daemon.pid, start_time(daemon.pid))  # its daemon runs: not an orphan
        assert reap_orphans(data) == [] and running(node.pid) and (data / MARKER_FILE).exists()
        _marker(data, node, 999_999_999, 1, leader_start=start_time(node.pid) - 1)  # PID since reused
        assert reap_orphans(data) == [] and running(node.pid) and not (data / MARKER_FILE).exists()
    finally:
        kill(daemon.pid, node.pid)
        daemon.wait(5)
        node.wait(5)


def _supernodes(script: Path) -> list[int]:
    """Live processes running the stand-in SuperNode script."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                argv = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(script).encode() in argv and running(int(p.name)):
                out.append(int(p.name))
    return out


@pytest.mark.slow  # two daemon starts: ~40 s on a busy 2-core machine
def test_sigkilled_daemon_leaves_no_supernode_and_a_restart_runs_exactly_one(tiny_model_dir, tmp_path):
    from test_daemon_process import DaemonProcess

    from dataclasses import fields

    from client.settings import DaemonSpec

    script = fake_node(tmp_path)
    # Transport is not under test (the stand-in never connects): opt in to plain where that is asked for.
    plain = {"insecure": True} if "insecure" in {f.name for f in fields(DaemonSpec)} else {}
    d = DaemonProcess(tmp_path / "data", tiny_model_dir, coordinator="127.0.0.1:9",
                      supernode_command=f"{sys.executable} {script}", **plain)
    seen: list[tuple[int, int]] = []
    try:
        d.start()
        wait_for(lambda: node_pids(script), 30, "the daemon started its SuperNode")
        [(node, child)] = seen = node_pids(script)
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)
        wait_for(lambda: not running(node), 5, f"SuperNode {node} died with the daemon")
        assert _supernodes(script) == []

        d.start()  # stops the old node's leftover child, then starts one node of its own
        wait_for(lambda: len(node_pids(script)) == 2, 30, "the restarted daemon started its SuperNode")
        seen = node_pids(script)
        assert not running(child)
        time.sleep(1.0)  # a second node would have been started by now
        assert _supernodes(script) == [p for p, _ in seen if p != node] and len(_supernodes(script)) == 1
        assert d.ok("get", "/v1/status")["federation"]["starts"] == 1
    finally:
        d.stop(signal.SIGKILL)
        kill(*[p for pair in seen for p in pair])
