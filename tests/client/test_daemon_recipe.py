"""One recipe everywhere: the daemon trains, selects, retrieves and decodes with the experiments'
defaults; automatic training waits for a history selection can decide on; the person sees why an
adapter was or was not adopted, and when automatic training will start."""

from __future__ import annotations

import pytest

from client.service import ClientService
from client.settings import DaemonSpec
from shared.config import ExperimentSpec, SelectionSpec, TrainSpec
from shared.data.synthetic import make_synthetic
from shared.selection import Selection, ValScore, history_needed, validation_size

# Every section a daemon shares with an experiment: one dataclass each, one set of defaults.
SHARED_SECTIONS = ("base_model", "base_adapter", "personal_adapter", "personal_train", "selection", "retrieval",
                   "decoding")


@pytest.mark.parametrize("section", SHARED_SECTIONS)
def test_daemon_defaults_are_the_experiment_defaults(section):
    assert getattr(DaemonSpec(), section) == getattr(ExperimentSpec(), section), (
        f"DaemonSpec.{section} and ExperimentSpec.{section} defaults differ: the daemon would train or answer "
        "with another recipe than the one docs/quality.md measured")


@pytest.mark.parametrize("spec", [SelectionSpec(), SelectionSpec(min_train=4, validation_fraction=0.5),
                                  SelectionSpec(min_train=1, min_validation=1), SelectionSpec(min_train=9)])
def test_history_needed_is_the_smallest_history_selection_trains_on(spec):
    needed = history_needed(spec)
    for n in range(1, 80):
        assert (n >= needed) == (n - validation_size(n, spec) >= spec.min_train), n
    assert history_needed(SelectionSpec(enabled=False)) == 1


def test_the_defaults_need_six_items():
    assert history_needed(SelectionSpec()) == 6  # 4 to train, 2 held out


def _val(loss: float, metric: float) -> ValScore:
    return ValScore(loss=loss, metric=metric)


def test_the_decision_in_words_names_the_kept_version_and_its_numbers():
    sel = Selection(adopted=True, reason="a checkpoint beat base + base adapter on validation", metric="mae",
                    train_items=12, validation_items=3, base=_val(1.2, 0.75), best=_val(1.1, 0.5), best_step=8,
                    total_steps=8, checks=[{"step": 8, "loss": 1.1, "metric": 0.5, "items_improved": 2}])
    assert sel.verdict("v000002") == ("kept v000002: validation mae 0.500 vs base 0.750 on 3 held-out items "
                                      "(answer loss 1.100 vs 1.200)")


def test_the_decision_in_words_says_why_nothing_was_adopted():
    sel = Selection(adopted=False, reason="no checkpoint beat base + base adapter on validation (a better metric "
                    "at a lower loss)", metric="mae", train_items=12, validation_items=3, base=_val(1.2, 0.5),
                    checks=[{"step": 4, "loss": 1.3, "metric": 1.0, "items_improved": 0},
                            {"step": 8, "loss": 1.25, "metric": 0.75, "items_improved": 1}])
    assert sel.verdict() == ("not adopted: validation mae 0.750 at best vs base 0.500 on 3 held-out items "
                             "(answer loss 1.250 vs 1.200); no checkpoint beat base + base adapter on validation "
                             "(a better metric at a lower loss)")
    few = Selection(adopted=False, reason="too little history: 3 items; selection needs 6", metric="mae",
                    train_items=1, validation_items=2)
    assert few.verdict() == "not adopted: too little history: 3 items; selection needs 6"


def _history(n: int):
    return make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=n, n_queries=1,
                          seed=7).eval_users[0].history


def test_automatic_training_waits_for_enough_history_and_reports_its_decision(tiny_engine, tmp_path):
    spec = DaemonSpec(task="synthetic-tag", retrain_after=3, selection=SelectionSpec(checks=1),
                      personal_train=TrainSpec(epochs=1, lr=2e-2, batch_size=4))
    svc = ClientService(spec, tmp_path / "dir", engine=tiny_engine)
    try:
        items = _history(6)
        assert svc.add(items[:3])["auto_train_job"] is None  # 3 new items, but selection needs 6
        status = svc.status()
        assert status["auto_train"]["message"] == "auto-training starts at 6 items; you have 3"
        assert status["auto_train"]["at"] == 6 and status["last_training"] is None
        assert svc.add(items[3:5])["auto_train_job"] is None
        job_id = svc.add(items[5:])["auto_train_job"]
        assert job_id is not None
        done = svc.jobs.wait(job_id, 180)
        assert done.state == "succeeded", done.error
        decision = done.result["decision"]
        assert decision.startswith(("kept v000001: validation accuracy", "not adopted: validation accuracy")), decision
        assert "on 2 held-out items" in decision
        last = svc.status()["last_training"]
        assert last["job"] == job_id and last["decision"] == decision and last["adopted"] == done.result["adopted"]
        nxt = svc.status()["auto_train"]
        assert nxt["at"] == 9 and nxt["message"] == "next automatic training at 9 items (3 new); you have 6"
    finally:
        svc.close()
        tiny_engine.reset_personal()


def test_automatic_training_off_says_so(tiny_engine, tmp_path):
    svc = ClientService(DaemonSpec(task="synthetic-tag", retrain_after=0), tmp_path / "dir", engine=tiny_engine)
    try:
        svc.add(_history(8))
        auto = svc.status()["auto_train"]
        assert auto["at"] is None and auto["message"].startswith("automatic training is off (retrain_after = 0)")
    finally:
        svc.close()
