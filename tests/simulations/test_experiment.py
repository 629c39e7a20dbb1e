"""End to end: on the real embedded model personalization beats the non-personalized model on
planted preferences; an experiment run (every default method, PAG's profiles included) writes a
complete, readable run directory (on the tiny model: same code path, a minute less). Adoption on
real histories with and without a personal signal: tests/shared/test_personal_selection.py."""

import json

import pytest

from shared.config import DataSpec, RetrievalSpec, TrainSpec, load_experiment
from shared.data import load_dataset
from shared.personalize import Context, history_examples
from shared.retrieval import InMemoryHistoryStore, make_retriever
from shared.tasks import get_task

from planted_preferences import plain_history_examples, planted_user


@pytest.mark.realmodel
def test_personal_adapter_beats_non_personalized_on_planted_preferences(real_engine):
    planted = planted_user(real_engine, seed=1, base_examples=32, base_train=TrainSpec(epochs=1, lr=5e-4, batch_size=8))
    user, baseline = planted.user, planted.baseline

    examples = plain_history_examples(planted.task, user)
    assert len(examples) == len(user.history)  # this user's history only
    real_engine.train_personal(examples, TrainSpec(epochs=2, lr=1e-3, batch_size=4), progress=False)
    personal = planted.accuracy(real_engine, personal=True)
    assert personal > baseline, (personal, baseline)
    assert personal >= 0.5


def test_training_examples_retrieve_only_earlier_history():
    ds = load_dataset(DataSpec(task="synthetic-tag", source="synthetic", users=1, base_users=0,
                               min_history=12, max_history=12))
    task = get_task(ds.task)
    user = ds.eval_users[0]
    store = InMemoryHistoryStore(task.item_text)
    store.add(user.history)
    ctx = Context(store, make_retriever("bm25", task.item_text), RetrievalSpec(k=3, store="memory"))
    examples = history_examples(task, user.history, ctx, "rag")
    for i, ex in enumerate(examples):
        context = ex.prompt.split(task.make_input(user.history[i]))[0]
        for later in user.history[i:]:
            assert task.render_item(later) not in context
    assert "earlier items" not in examples[0].prompt and "earlier items" in examples[-1].prompt


def test_experiment_writes_a_complete_run_directory(tiny_model_dir, tmp_path):
    from simulations.experiment import run_experiment

    spec = load_experiment(None, [f'base_model.path="{tiny_model_dir}"', 'base_model.quantization="none"',
        'data.task="synthetic-tag"', 'data.source="synthetic"', "data.users=1", "data.base_users=4",
        "data.queries=3", "data.min_history=6", "data.max_history=6", "data.base_examples=16",
        "personal_train.epochs=1", "base_train.epochs=1", "retrieval.profile_max_tokens=12",
    ])
    run = run_experiment(spec, tmp_path / "run", progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["aggregate"]) == set(spec.methods)
    assert metrics["improvement_over_non_personalized"]["non-personalized"]["accuracy"] in (0.0, None)
    for m in spec.methods:
        preds = json.loads((run / "predictions" / f"{m}.json").read_text())
        assert preds["task"] == "synthetic-tag" and len(preds["golds"]) == 3
    table = (run / "results.md").read_text()
    assert "OPPU+RAG" in table and "accuracy" in table
    assert load_experiment(run / "config.toml") == spec
    user_dir = next((run / "users").iterdir())
    selection = json.loads((user_dir / "selection.json").read_text())
    for aug in ("plain", "rag", "pag"):  # an adapter is saved exactly when it was adopted, and says why
        assert selection[aug]["reason"] and selection[aug]["validation_items"] == 2
        saved = (user_dir / f"personal-{aug}" / "adapter_model.safetensors").exists()
        assert saved == selection[aug]["adopted"], (aug, selection[aug]["reason"])
    assert metrics["adoption"]["OPPU"] == {"adopted": int(selection["plain"]["adopted"]), "users": 1}
    assert (run / "base_adapter" / "oppu_adapter.json").exists()
    assert (run / "log.txt").read_text()


def _planted(n_users: int = 12, n_queries: int = 4):
    """Users who each favour one tag; OPPU knows it, non-personalized always says "comedy", RAG is
    right half the time; a user's history holds their favourite tag."""
    from shared.records import HistoryItem, Query, UserData
    from simulations.experiment import UserResult

    task = get_task("synthetic-tag")
    tags = [t for t in task.labels if t != "comedy"]
    users, results = [], []
    for i in range(n_users):
        fav = tags[i % len(tags)]
        history = [HistoryItem(f"u{i}-h{j}", {"description": f"film {j}", "tag": fav if j % 3 else "comedy"}, time=j + 1)
                   for j in range(6)]
        queries = [Query(f"u{i}-q{j}", task.make_input(HistoryItem("x", {"description": "d", "tag": fav})), fav)
                   for j in range(n_queries)]
        users.append(UserData(f"u{i}", history, queries))
        results.append(UserResult(f"u{i}", 6, {
            "non-personalized": {q.id: "comedy" for q in queries},
            "RAG": {q.id: fav if j % 2 else "comedy" for j, q in enumerate(queries)},
            "OPPU": {q.id: fav for q in queries},
        }))
    return task, users, results


def test_scores_carry_cis_paired_differences_and_baselines():
    from simulations.experiment import render_results, score

    task, users, results = _planted()
    metrics = score(task, ("non-personalized", "RAG", "OPPU"), users, results, base_users=[], n_boot=500, n_perm=500)
    stats, base = metrics["stats"], metrics["baselines"]
    assert base["methods"] == ["baseline: user majority", "baseline: global majority"]
    assert base["aggregate"]["baseline: user majority"]["accuracy"] == 1.0  # the history's majority is the favourite
    assert base["best"] == "baseline: user majority"
    assert stats["users"] == 12 and stats["queries"] == 48
    assert stats["references"] == ["non-personalized", "RAG", "baseline: user majority"]
    ci = stats["ci"]["RAG"]["accuracy"]
    assert ci["mean"] == metrics["aggregate"]["RAG"]["accuracy"] == 0.5 and ci["lo"] <= 0.5 <= ci["hi"]
    win = stats["vs"]["non-personalized"]["OPPU"]["accuracy"]
    assert win["gain"] == 1.0 and win["lo"] > 0 and win["p"] < 0.01
    # Every LLM method is flagged: none beats the user's own majority tag.
    assert stats["below_best_baseline"] == ["non-personalized", "RAG", "OPPU"]
    json.dumps(metrics)  # all of it goes to metrics.json

    metrics["adoption"] = {"OPPU": {"adopted": 11, "users": 12}}
    table = render_results(metrics, {"eval_users": 12, "queries": 48, "source": "hand-made"})
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "Δaccuracy vs non-pers. [95% CI]" in rows["method"] and "Δaccuracy vs RAG [95% CI]" in rows["method"]
    assert "accuracy ↑ [95% CI]" in rows["method"] and "adopted" in rows["method"]
    assert "+1.0000* [+1.0000, +1.0000]" in rows["OPPU"] and "11/12" in rows["OPPU"]
    assert "below best non-LLM baseline" in rows["OPPU"]
    assert "0.5000 [" in rows["RAG"] and "(reference)" in rows["RAG"]
    assert "baseline: user majority" in rows and "below best" not in rows["baseline: user majority"]
    assert "percentile bootstrap over the 12 users" in table


def test_a_method_above_the_baselines_is_not_flagged_and_metrics_md_has_the_differences():
    from simulations.experiment import score
    from simulations.reports.run_outputs import metrics_markdown

    task, users, results = _planted()
    for u, r in zip(users, results):  # the history now points away from the favourite tag
        u.history = [type(it)(it.id, {**it.fields, "tag": "comedy"}, it.time) for it in u.history]
    metrics = score(task, ("non-personalized", "RAG", "OPPU"), users, results, n_boot=300, n_perm=300)
    # Everyone's majority is now "comedy", which is exactly what non-personalized answers: a tie is no win.
    assert metrics["stats"]["below_best_baseline"] == ["non-personalized"]
    md = metrics_markdown(metrics, {"users": {}})
    assert "## Paired differences" in md and "baseline: global majority" in md
    scores = md.split("## Paired differences")[0]
    rows = {line.split("|")[1].strip(): line for line in scores.splitlines() if line.startswith("| ")}
    assert "below best non-LLM baseline" in rows["non-personalized"] and "below best" not in rows["OPPU"]


@pytest.mark.slow  # two whole runs: ~60 s of CPU; make test keeps tests/shared/test_group_training.py
def test_users_trained_together_get_what_each_would_get_alone(tiny_model_dir, tmp_path):
    """The harness trains `personal_train.users_per_pass` users in one pass; with dropout 0 every
    user's selection decisions, saved adapters and answers equal the one-user-at-a-time run."""
    from simulations.experiment import run_experiment

    common = [f'base_model.path="{tiny_model_dir}"', 'base_model.quantization="none"',
              'data.task="synthetic-tag"', 'data.source="synthetic"', "data.users=2", "data.base_users=2",
              "data.queries=2", "data.min_history=8", "data.max_history=10", "data.base_examples=8",
              "personal_train.epochs=2", "personal_train.lr=5e-3", "base_train.epochs=1",
              "personal_adapter.dropout=0.0", 'methods=["OPPU","OPPU+RAG"]']
    runs, hooked = {}, {1: 0, 2: 0}
    for per_pass in (1, 2):
        spec = load_experiment(None, common + [f"personal_train.users_per_pass={per_pass}"])
        runs[per_pass] = run_experiment(spec, tmp_path / f"run{per_pass}", progress=False,
                                        between_users=lambda k=per_pass: hooked.__setitem__(k, hooked[k] + 1))
    assert hooked == {1: 2, 2: 1}  # the between-users hook runs once before each pass
    m1, m3 = (json.loads((runs[k] / "metrics.json").read_text()) for k in (1, 2))
    assert m1["adoption"] == m3["adoption"]
    users = sorted(p.name for p in (runs[1] / "users").iterdir())
    assert len(users) == 2
    for user in users:
        s1, s3 = (json.loads((runs[k] / "users" / user / "selection.json").read_text()) for k in (1, 2))
        for aug in ("plain", "rag"):
            assert s1[aug]["adopted"] == s3[aug]["adopted"] and s1[aug]["best_step"] == s3[aug]["best_step"]
            assert [c["step"] for c in s1[aug]["checks"]] == [c["step"] for c in s3[aug]["checks"]]
            for c1, c3 in zip(s1[aug]["checks"], s3[aug]["checks"]):
                assert c3["loss"] == pytest.approx(c1["loss"], rel=2e-3, abs=1e-4), (user, aug)
        p1, p3 = (json.loads((runs[k] / "users" / user / "predictions.json").read_text()) for k in (1, 2))
        assert p1 == p3, user
    trained = [json.loads((runs[2] / "users" / u / "selection.json").read_text())["plain"]["checks"] for u in users]
    assert any(trained), "no user was trained: the test would not compare anything"
