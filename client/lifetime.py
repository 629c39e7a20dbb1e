"""The SuperNode's lifetime is bounded by the daemon's (client/supernode.py starts it, client/daemon.py
reaps what a killed daemon left).

Three guarantees, each for the case the previous one misses:

1. Parent-death signal. The SuperNode is started with PR_SET_PDEATHSIG = SIGKILL (Linux prctl, set
   in the child between fork and exec), so the kernel kills it when the daemon thread that started
   it dies, SIGKILL of the daemon included. Flower's own children (flower-superexec, the ClientApp
   process) watch their parent's PID and exit when it is gone.
2. The data-directory lock. The SuperNode inherits the daemon's flock descriptor (DIR/daemon.lock),
   so while any SuperNode of this directory lives, no second daemon can take the directory and
   start a second node.
3. A marker, DIR/supernode.json, written when a SuperNode starts and removed once its process group
   is gone:

       {"pgid": int,          the SuperNode's process group (it leads its own session)
        "leader_start": int,  its start time (clock ticks since boot, /proc/PID/stat field 22)
        "daemon_pid": int, "daemon_start": int}   the daemon that started it

   The next daemon start reaps that group (SIGTERM, then SIGKILL) before anything else touches the
   directory, so crash recovery never deletes temporary files a surviving ClientApp is still
   writing. Start times guard against PID reuse: a live leader with another start time is not ours.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from shared.fileio import atomic_write

log = logging.getLogger(__name__)

MARKER_FILE = "supernode.json"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


# ----------------------------------------------------------------------------- the child side


def pdeathsig_preexec(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A Popen `preexec_fn` that makes the child receive `sig` when its parent dies; None where the
    kernel has no such setting (not Linux). libc's prctl is looked up here, in the parent: the
    child between fork and exec only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(126)  # refuse to run a node that could outlive the daemon
        if os.getppid() != parent:  # the daemon died between fork and prctl
            os._exit(126)

    return preexec


# ----------------------------------------------------------------------------- processes


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None when it is gone or a zombie.
    Where /proc is missing (not Linux), 0 for any live PID: liveness only, no reuse guard."""
    if not Path("/proc/self/stat").exists():  # pragma: no cover - not Linux
        return 0 if _alive(pid) else None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    proc = Path("/proc")
    if not proc.is_dir():  # pragma: no cover - not Linux
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    out = []
    for p in proc.iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            out.append(int(p.name))
    return sorted(out)


def stop_group(pgid: int, *, timeout: float = 5.0) -> list[int]:
    """SIGTERM every process of the group, SIGKILL what is left after `timeout`, and wait until
    none is left. Returns the PIDs that were alive at first."""
    members = group_members(pgid)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        if not group_members(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + wait
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
    left = group_members(pgid)
    if left:
        log.error("process group %d still has members %s after SIGKILL", pgid, left)
    return members


# ----------------------------------------------------------------------------- the marker


def write_marker(data_dir: Path, pgid: int) -> None:
    """Record the SuperNode this daemon started (see the module docstring)."""
    me = os.getpid()
    record = {"pgid": pgid, "leader_start": start_time(pgid), "daemon_pid": me, "daemon_start": start_time(me)}
    atomic_write(Path(data_dir) / MARKER_FILE, json.dumps(record), mode=0o600)


def clear_marker(data_dir: Path) -> None:
    (Path(data_dir) / MARKER_FILE).unlink(missing_ok=True)


def read_marker(data_dir: Path) -> dict[str, Any] | None:
    """The recorded SuperNode, or None (none recorded, or a record that is not ours to act on)."""
    path = Path(data_dir) / MARKER_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s); ignoring it", path, e)
        return None
    ints = ("pgid", "daemon_pid")
    if not isinstance(record, dict) or not all(isinstance(record.get(k), int) and record[k] > 1 for k in ints):
        log.warning("%s does not describe a process group; ignoring it", path)
        return None
    return record


def recorded_daemon_alive(record: dict[str, Any]) -> bool:
    """Is the daemon that wrote the marker still running (same PID and start time)?"""
    now = start_time(record["daemon_pid"])
    return now is not None and now == record.get("daemon_start", now)


def reap_orphans(data_dir: Path, *, timeout: float = 5.0) -> list[int]:
    """Stop the SuperNode process group a previous daemon of `data_dir` left behind (see the module
    docstring). Call it with the data-directory lock held, or after failing to take it because the
    lock's holder may be that orphan. Never touches a group whose daemon is alive or whose leader
    PID now belongs to another process. Returns the PIDs stopped."""
    record = read_marker(data_dir)
    if record is None:
        return []
    if record["daemon_pid"] != os.getpid() and recorded_daemon_alive(record):
        return []  # a running daemon's node: not an orphan
    pgid = record["pgid"]
    leader = start_time(pgid)
    if leader is not None and record.get("leader_start") is not None and leader != record["leader_start"]:
        clear_marker(data_dir)  # the PID was reused by an unrelated process
        return []
    stopped = stop_group(pgid, timeout=timeout)
    if stopped:
        log.warning("stopped %d process(es) %s of the SuperNode a previous daemon of %s left running",
                    len(stopped), stopped, data_dir)
    if not group_members(pgid):
        clear_marker(data_dir)
    return stopped
