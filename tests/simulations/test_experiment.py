"""End to end: on the real embedded model personalization beats the non-personalized model on
planted preferences; an experiment run (every default method, PAG's profiles included) writes a
complete, readable run directory (on the tiny model: same code path, a minute less)."""

import json

import pytest

from shared.config import DataSpec, RetrievalSpec, TrainSpec, load_experiment
from shared.personalize import Context, history_examples, prompt_for
from shared.retrieval import InMemoryHistoryStore, make_retriever
from shared.tasks import get_task
from simulations.datasets import load_dataset
from simulations.experiment import base_examples


def _accuracy(task, answers, queries):
    return task.score([task.parse_output(a) for a in answers], [q.target for q in queries])["accuracy"]


@pytest.mark.realmodel
def test_personal_adapter_beats_non_personalized_on_planted_preferences(real_engine):
    spec = load_experiment(None, [
        'data.task="synthetic-tag"', 'data.source="synthetic"', "data.users=1", "data.base_users=12",
        "data.queries=10", "data.min_history=20", "data.max_history=20", "data.seed=1",
        "data.base_examples=32", 'retrieval.store="memory"',
    ])
    ds = load_dataset(spec.data)
    task = get_task(ds.task)
    user = ds.eval_users[0]
    real_engine.train_base(base_examples(task, spec, ds.base_users), TrainSpec(epochs=1, lr=5e-4, batch_size=8),
                           progress=False)
    prompts = [prompt_for(task, None, q.input, "plain") for q in user.queries]
    baseline = _accuracy(task, real_engine.answer(prompts, max_new_tokens=task.max_new_tokens, personal=False),
                         user.queries)

    store = InMemoryHistoryStore(task.item_text)
    store.add(user.history)
    ctx = Context(store, make_retriever("bm25", task.item_text), RetrievalSpec(store="memory"))
    examples = history_examples(task, user.history, ctx, "plain")
    assert len(examples) == len(user.history)  # this user's history only
    real_engine.train_personal(examples, TrainSpec(epochs=2, lr=1e-3, batch_size=4), progress=False)
    personal = _accuracy(task, real_engine.answer(prompts, max_new_tokens=task.max_new_tokens, personal=True),
                         user.queries)
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
    for aug in ("plain", "rag", "pag"):
        assert (user_dir / f"personal-{aug}" / "adapter_model.safetensors").exists()
    assert (run / "base_adapter" / "oppu_adapter.json").exists()
    assert (run / "log.txt").read_text()
