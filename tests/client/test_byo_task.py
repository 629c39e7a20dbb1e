"""End to end, your own task and data: a task defined in daemon.toml and one author's git commits
imported for it are stored, trained on and answered by the daemon's service (tiny random model:
the plumbing is under test, not the answers' quality)."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest

from client.service import ClientService
from client.settings import load_daemon
from shared.config import SelectionSpec, TrainSpec
from shared.data.importers import import_git, parse_mapping
from shared.records import HistoryItem
from shared.tasks import TASKS, get_task

CONFIG = '''
task = "change-headline"
retrain_after = 0

[[tasks]]
name = "change-headline"
kind = "generation"
fields = ["change", "headline"]
target = "headline"
instruction = "Write the headline of this change: {change}"
'''


@pytest.fixture
def repo(tmp_path):
    """Ten commits with a body by Ada, one by someone else, and a merge."""
    path = tmp_path / "repo"
    path.mkdir()
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_COMMITTER_NAME": "C", "GIT_COMMITTER_EMAIL": "c@example.org"}

    def git(*args, who="Ada Lovelace"):
        subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True,
                       env={**env, "GIT_AUTHOR_NAME": who, "GIT_AUTHOR_EMAIL": "x@example.org"})

    git("init", "-q", "-b", "main")
    for i in range(10):
        git("commit", "-q", "--allow-empty", "-m", f"engine: step {i}\n\nMake the engine do step {i} before {i + 1}.")
    git("commit", "-q", "--allow-empty", "-m", "other\n\nSomeone else's body.", who="Bob Builder")
    return path


@pytest.fixture
def registry():
    saved = dict(TASKS)
    yield
    TASKS.clear()
    TASKS.update(saved)


@pytest.mark.slow
def test_a_config_task_with_imported_git_history_is_stored_trained_and_answered(tmp_path, repo, registry, tiny_engine):
    (tmp_path / "daemon.toml").write_text(CONFIG)
    spec = load_daemon(tmp_path / "daemon.toml")
    task = get_task(spec.task)
    items = import_git(repo, "Ada Lovelace", task, parse_mapping(["change=body", "headline=subject"], task)).items
    assert len(items) == 10 and items[0].fields == {"change": "Make the engine do step 0 before 1.",
                                                    "headline": "engine: step 0"}
    spec = dataclasses.replace(spec, personal_train=TrainSpec(epochs=1, lr=2e-2, batch_size=4),
                               selection=SelectionSpec(enabled=False))
    svc = ClientService(spec, tmp_path / "dir", engine=tiny_engine)
    try:
        assert svc.add(items)["history_count"] == 10
        status = svc.status()["daemon"]
        assert (status["task"], status["item_fields"]) == ("change-headline", ["change", "headline"])
        job = svc.jobs.wait(svc.train().id, 120)
        assert job.state == "succeeded", job.error
        question = task.make_input(HistoryItem("q", {"change": "Make the engine do step 10 before 11."}))
        answer = svc.ask(question, max_new_tokens=6)
        assert answer["personal_version"] == 1 and answer["prediction"] == task.parse_output(answer["answer"])
        assert answer["retrieved"]  # the history is searched with the change's text
    finally:
        svc.close()
        tiny_engine.reset_personal()
