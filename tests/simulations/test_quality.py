"""`make quality`'s page: runs, tables with CIs and baselines, the claims checked, the machine."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest


def _config(tmp_path, tiny_model_dir):
    cfg = tmp_path / "q.toml"
    cfg.write_text(f'''
methods = ["non-personalized", "RAG", "OPPU", "OPPU+RAG"]
[data]
task = "synthetic-rating"
source = "synthetic"
users = 3
base_users = 2
base_examples = 8
queries = 2
min_history = 8
max_history = 8
[base_model]
path = "{tiny_model_dir}"
quantization = "none"
[personal_train]
epochs = 1
[retrieval]
store = "memory"
''')
    return cfg


def test_quality_page_checks_the_claims_on_its_own_numbers(tmp_path, tiny_model_dir):
    from simulations.quality import main

    cfg = _config(tmp_path, tiny_model_dir)
    out = tmp_path / "quality.md"
    assert main(["--config", str(cfg), "--out", str(out), "--runs", str(tmp_path / "runs")]) == 0
    page = out.read_text()
    assert "## synthetic-rating (3 users, 6 queries" in page and "Machine: " in page and "cores" in page
    assert "OPPU+RAG at least as good as RAG" in page and "OPPU no worse than non-personalized" in page
    assert "baseline: user mode" in page and "[95% CI]" in page and "adopted on validation" in page
    # The page again from the finished run directory alone (tasks run side by side, one process
    # each): the same tables and claims, the given wall time and note; a directory that holds no
    # finished run is refused by name.
    run_dir = next((tmp_path / "runs").iterdir())
    again = tmp_path / "again.md"
    assert main(["--from-runs", str(run_dir), "--out", str(again), "--wall-minutes", "12.5",
                 "--note", "Ran side by side."]) == 0
    text = again.read_text()
    assert "Wall time 12.5 min in all. Ran side by side." in text
    table = page.split("## synthetic-rating", 1)[1].split("Run directory", 1)[0]
    assert table in text
    with pytest.raises(SystemExit):
        main(["--from-runs", str(tmp_path), "--out", str(again)])


def test_runs_side_by_side_one_process_each_and_the_page_holds_every_run(tmp_path, tiny_model_dir, monkeypatch):
    from simulations.quality import main

    _config(tmp_path, tiny_model_dir)
    out, runs = tmp_path / "quality.md", tmp_path / "runs"
    monkeypatch.chdir(tmp_path)  # relative paths mean to the child processes what they mean here
    assert main(["--config", "q.toml", "--config", "q.toml", "--jobs", "2", "--out", "quality.md", "--runs", "runs"]) == 0
    page = out.read_text()
    assert page.count("## synthetic-rating (3 users, 6 queries") == 2
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    # (the run still going when the other finished may have taken its cores: timing decides)
    assert re.search(rf"ran side by side \(2 processes, {threads} torch thread\(s\) each"
                     rf"(; q-\d went on with \d+ after q-\d finished)?\); ", page)
    dirs = sorted(d for d in runs.iterdir() if d.is_dir())
    assert len(dirs) == 2 and all((d / "metrics.json").is_file() for d in dirs)
    assert all(f"`{d}`" in page for d in dirs)  # each run named on the page, none twice
    assert sorted(p.name for p in runs.glob("*.log")) == ["q-1.log", "q-2.log"]


def test_a_child_takes_the_threads_its_parent_writes(tmp_path):
    import torch

    from simulations.quality import follow_threads

    before = torch.get_num_threads()
    share = tmp_path / "share"
    check = follow_threads(share)
    try:
        check()  # no word from the parent yet: nothing changes
        assert torch.get_num_threads() == before
        share.write_text("not a number")
        check()
        assert torch.get_num_threads() == before
        share.write_text(str(before + 1))
        check()
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_a_finished_run_hands_its_cores_to_the_run_still_going(tmp_path, monkeypatch):
    """Two runs on two cores, one thread each: once the first finishes (and nothing waits), the
    parent tells the second to take both; the page's note says so; no share file is left."""
    import argparse
    import json

    import simulations.quality as q

    seen = []  # (stem, threads its share file held) at each poll

    class FakeRun:
        polls_left = {"a": 2, "b": 4}

        def __init__(self, cmd, env, stdout, stderr):
            self.stem = Path(cmd[cmd.index("--config") + 1]).stem
            self.out = Path(cmd[cmd.index("--child") + 1])
            self.share = Path(cmd[cmd.index("--threads-file") + 1])
            assert env["OMP_NUM_THREADS"] == "1"
            self.returncode = None

        def poll(self):
            seen.append((self.stem, int(self.share.read_text())))
            FakeRun.polls_left[self.stem] -= 1
            if FakeRun.polls_left[self.stem] > 0:
                return None
            run_dir = tmp_path / "runs" / f"run-{self.stem}"
            run_dir.mkdir(parents=True)
            (run_dir / "metrics.json").write_text(json.dumps({"seconds": 1.0}))
            (run_dir / "results.md").write_text(f"results of {self.stem}\n")
            self.out.write_text(str(run_dir))
            self.returncode = 0
            return 0

        def terminate(self):
            pass

    monkeypatch.setattr(q.subprocess, "Popen", FakeRun)
    monkeypatch.setattr(q.time, "sleep", lambda s: None)
    monkeypatch.setattr(q.os, "sched_getaffinity", lambda pid: {0, 1})
    args = argparse.Namespace(runs=str(tmp_path / "runs"), set=[], note="")
    runs, note = q.side_by_side(["a.toml", "b.toml"], args, jobs=2)
    assert [d.name for d, _ in runs] == ["run-a", "run-b"]
    assert seen == [("a", 1), ("b", 1), ("a", 1), ("b", 2), ("b", 2), ("b", 2)]
    assert "(2 processes, 1 torch thread(s) each; b went on with 2 after a finished)" in note
    assert not list((tmp_path / "runs").glob(".*.threads"))

    # A run that fails stops the others; none leaves a share file behind.
    class Failing(FakeRun):
        polls_left = {"a": 1, "b": 5}

        def poll(self):
            if self.stem == "a":
                self.returncode = 1
                return 1
            return None

    monkeypatch.setattr(q.subprocess, "Popen", Failing)
    with pytest.raises(SystemExit, match="a.toml failed"):
        q.side_by_side(["a.toml", "b.toml"], args, jobs=2)
    assert not list((tmp_path / "runs").glob(".*.threads"))
