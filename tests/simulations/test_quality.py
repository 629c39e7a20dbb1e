"""`make quality`'s page: runs, tables with CIs and baselines, the claims checked, the machine."""

from __future__ import annotations

import os

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
    assert f"ran side by side (2 processes, {threads} torch thread(s) each)" in page
    dirs = sorted(d for d in runs.iterdir() if d.is_dir())
    assert len(dirs) == 2 and all((d / "metrics.json").is_file() for d in dirs)
    assert all(f"`{d}`" in page for d in dirs)  # each run named on the page, none twice
    assert sorted(p.name for p in runs.glob("*.log")) == ["q-1.log", "q-2.log"]
