"""Memory of a real `oppu client daemon` (the embedded SmolLM2-135M-Instruct, nf4) over three
training jobs: idle <= 1 GB, peak <= 3 GB, back to idle after each job, flat across jobs.

The history is one real Amazon reviewer's reviews (amazon-rating), added over the API as a person
would. Resident memory is read from /proc/PID/status (VmRSS sampled every 50 ms, VmHWM at the end).
The fast test below checks the mechanism that gives memory back after a job (client.jobs).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from client.jobs import JobRegistry
from shared.data.amazon import read_reviews, reviews_path
from test_daemon_process import DaemonProcess  # noqa: E402 - tests/client is on sys.path (rootdir-relative)

MB = 1 << 20
IDLE_MB = 1024  # idle: after start, after the history is added and asked, and after each job
PEAK_MB = 3072  # VmHWM over the daemon's whole life: model load, adding, answering, training
FLAT_MB = 64  # idle after job 3 at most this much above idle after job 1
SETTLE_S = 5.0  # how long "back to idle" may take once a job has ended
HISTORY = 12  # the reviewer's most recent reviews before the held-out ones (3 steps a job)


def status_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


class RssSampler(threading.Thread):
    """The highest VmRSS of a process seen every `every` seconds, until stopped."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, status_mb(self.pid)["VmRSS"])
            except (OSError, KeyError):
                return
            time.sleep(self.every)


def settled_rss(pid: int, limit: float, within: float = SETTLE_S) -> float:
    """VmRSS once it is at most `limit`, or the lowest seen within `within` seconds."""
    low, deadline = float("inf"), time.monotonic() + within
    while True:
        low = min(low, status_mb(pid)["VmRSS"])
        if low <= limit or time.monotonic() >= deadline:
            return low
        time.sleep(0.1)


def reviewer_history() -> tuple[list[dict], list[str]]:
    """The most active reviewer's HISTORY reviews before their 3 most recent (the questions)."""
    path = reviews_path()
    if not path.is_file():
        pytest.skip(f"{path} not found (set OPPU_DATA_DIR)")
    by_reviewer: dict[str, list] = defaultdict(list)
    for r in read_reviews(path):
        by_reviewer[r.reviewer].append(r)
    reviews = sorted(max(by_reviewer.values(), key=len), key=lambda r: (r.time, r.line))
    history, questions = reviews[:-3][-HISTORY:], reviews[-3:]
    items = [{"id": f"{r.reviewer}-{r.asin}", "fields": {"text": r.text, "score": int(r.rating)}, "time": r.time}
             for r in history]
    return items, [r.text for r in questions]


class RealModelDaemon(DaemonProcess):
    """A daemon on the embedded model with the daemon's own defaults, except: one epoch per job,
    its training thread at normal priority (a shared test machine would starve a niced one), and
    no built-in base adapter trained at start when none is cached (that job takes many minutes;
    a cached one is loaded as usual)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, Path("unused"))
        self.config.write_text('task = "amazon-rating"\nretrain_after = 0\ntrain_nice = 0\n'
                               '[personal_train]\nepochs = 1\n[builtin_base]\nwhen_missing = "untrained"\n')


@pytest.mark.realmodel
@pytest.mark.slow
def test_daemon_memory_over_three_training_jobs(tmp_path, capsys):
    items, questions = reviewer_history()
    daemon = RealModelDaemon(tmp_path / "data").start(wait=False)
    pid = daemon.proc.pid
    sampler = RssSampler(pid)
    sampler.start()
    rows: list[tuple[str, float]] = []

    def idle(name: str) -> float:
        """Resident memory once settled, which must be idle (checked at once: an old daemon fails
        after its first job, not three jobs later)."""
        mb = settled_rss(pid, IDLE_MB)
        rows.append((name, mb))
        with capsys.disabled():
            print(f"\n[daemon memory] {name}: {mb:.0f} MiB (peak so far {sampler.peak:.0f})", end="")
        assert mb <= IDLE_MB, f"{name}: {mb:.0f} MiB resident {SETTLE_S:.0f} s later (idle must be <= {IDLE_MB})"
        return mb

    try:
        daemon.wait_ready(timeout=300)
        idle("started")
        assert daemon.ok("post", "/v1/history", json={"items": items})["added"] == len(items)
        daemon.ok("post", "/v1/ask", json={"fields": {"text": questions[0]}})
        idle(f"{len(items)} items added, one answer")
        after = []
        for n in (1, 2, 3):
            job, _ = daemon.wait_job(daemon.ok("post", "/v1/train", json={})["id"], timeout=1800)
            assert job["state"] == "succeeded", job
            after.append(idle(f"after job {n} ({job['steps_done']} steps)"))
        peak = max(sampler.peak, status_mb(pid)["VmHWM"])
    finally:
        sampler.done.set()
        daemon.stop()
    with capsys.disabled():
        print(f"\n[daemon memory] peak {peak:.0f} MiB")
    assert peak <= PEAK_MB, f"peak {peak:.0f} MiB (must be <= {PEAK_MB})"
    assert after[2] - after[0] <= FLAT_MB, f"idle grew from {after[0]:.0f} to {after[2]:.0f} MiB over three jobs"


def _self_rss_mb() -> float:
    return status_mb(os.getpid())["VmRSS"]


def test_a_finished_job_gives_its_memory_back(tmp_path):
    """What a job freed, reference cycles included, is returned to the OS when it ends.

    The job keeps many 64 KiB buffers in a reference cycle (only the cycle collector frees them)
    interleaved with small objects it leaves behind, as a training run leaves tensors and Python
    objects scattered through its thread's heap; glibc keeps such freed memory unless asked."""
    jobs = JobRegistry(tmp_path / "jobs")
    kept: list[bytes] = []

    def job(ctl) -> dict:
        class Node:
            pass

        node = Node()
        node.self, node.blocks = node, []
        for i in range(3000):  # ~190 MiB
            node.blocks.append(bytearray(64 << 10))
            kept.append(bytes(600 + i % 7))  # malloc, not pymalloc: survives the job between the blocks
        return {}

    gc.collect()
    before = _self_rss_mb()
    done = jobs.wait(jobs.submit("train", job).id, 60)
    assert done.state == "succeeded"
    after = settled_rss(os.getpid(), before + 48, within=2.0)
    assert after <= before + 48, f"{after - before:.0f} MiB still resident after the job ended"
