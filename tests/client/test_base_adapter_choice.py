"""Which base adapter answers a daemon (named, the coordinator's, the cached built-in one,
untrained), and what a personal adapter trained on another base adapter does (issue 17, items 1
and 3). Tiny random model; the built-in adapter's training is cut to a few base users and steps."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from client.basechoice import Preparing
from client.service import ClientService
from client.settings import DaemonSpec
from shared import builtin_base
from shared.adapters import ADAPTER_MANIFEST, AdapterManifest
from shared.config import BaseModelSpec, BuiltinBaseSpec, SelectionSpec, TrainSpec
from shared.data.synthetic import make_synthetic

SMALL_BASE = BuiltinBaseSpec(base_users=4, base_examples=12, train=TrainSpec(epochs=1, lr=5e-4, batch_size=4))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """An engine of its own: these tests train and swap its base adapter."""
    from shared.engine import Engine

    return Engine(BaseModelSpec(path=str(tiny_model_dir), quantization="none"))


def daemon_spec(tiny_model_dir, cache, **kw) -> DaemonSpec:
    kw.setdefault("builtin_base", SMALL_BASE)
    return DaemonSpec(retrain_after=0, base_model=BaseModelSpec(path=str(tiny_model_dir), quantization="none",
                                                                cache_dir=str(cache)), **kw)


@pytest.fixture
def untrained(engine):
    """Each test starts from an untrained base adapter and an empty personal slot."""
    zero = {k: torch.zeros_like(v) if ".lora_B." in k else v.clone() for k, v in engine.base_state().items()}
    engine.set_base_state(zero)
    engine.reset_personal()
    yield engine
    engine.set_base_state(zero)
    engine.reset_personal()


def ask_rating(svc) -> dict:
    return svc.ask("What is the score of this review? Just answer with 1, 2, 3, 4, or 5. review: great strings")


def test_a_fresh_daemon_trains_caches_and_then_reuses_the_builtin_base_adapter(untrained, tiny_model_dir, tmp_path):
    spec = daemon_spec(tiny_model_dir, tmp_path / "cache")
    svc = ClientService(spec, tmp_path / "a", engine=untrained)
    try:
        # Before the job: untrained, and every answer says so; an answer without a rating has no prediction.
        before = ask_rating(svc)
        assert before["base_adapter_source"] == "untrained" and before["base_adapter_version"] == "untrained"
        assert any("untrained" in w and "trained when the daemon starts" in w for w in before["warnings"])
        assert before["prediction"] == svc.task.parse_answer(before["answer"])
        if before["prediction"] is None:
            assert "no prediction: the answer is not a whole rating 1-5" in before["warnings"], before
        svc.start()  # first start: the built-in base adapter is a job
        job = svc.jobs.get(svc.base.job_id)
        assert job.kind == "base-adapter" and job.trigger == "first start"
        try:
            ask_rating(svc)
        except Preparing as e:  # asking while it trains waits for it, naming the job
            assert e.job.id == job.id and "being prepared" in str(e)
        done = svc.jobs.wait(job.id, 120)
        assert done.state == "succeeded", done.error
        assert done.steps_total == done.steps_done > 0 and done.phase.startswith("saving it to")
        status = svc.status()
        base = status["base_adapter"]
        assert base["source"] == "builtin" and base["version"] == done.result["base_adapter"] != "untrained"
        assert not any("untrained" in p for p in status["problems"]), status["problems"]
        after = ask_rating(svc)
        assert (after["base_adapter_source"], after["base_adapter_version"]) == ("builtin", base["version"])
        assert not any("untrained" in w for w in after["warnings"])
        entry = tmp_path / "cache" / "base-adapters" / "amazon-rating"
        (cached,) = [p for p in entry.iterdir() if not p.name.startswith(".")]
        manifest = json.loads((cached / ADAPTER_MANIFEST).read_text())
        assert manifest["role"] == "base" and manifest["task"] == "amazon-rating" and manifest["train"]["builtin"]
        assert manifest["train"]["recipe_key"].startswith(cached.name)
    finally:
        svc.close()

    # Another data directory, same settings: the cached adapter answers at once, no job.
    svc = ClientService(spec, tmp_path / "b", engine=untrained)
    try:
        svc.start()
        assert svc.base.job_id is None and svc.jobs.active() is None
        assert svc.host.base_info["source"] == "builtin" and svc.host.base_info["version"] == base["version"]
    finally:
        svc.close()


def test_a_stale_cache_entry_is_rejected(untrained, tiny_model_dir, tmp_path):
    spec = daemon_spec(tiny_model_dir, tmp_path / "cache")
    root = builtin_base.cache_dir(spec.base_model)
    kw = dict(model_hash=untrained.model_hash, base_model=spec.base_model, base_adapter=spec.base_adapter,
              retrieval=spec.retrieval)
    recipe = builtin_base.build_recipe("amazon-rating", SMALL_BASE, **kw)
    assert builtin_base.prepare(untrained, recipe, root) == builtin_base.entry_dir(root, recipe)
    assert builtin_base.find_cached(root, recipe)[0] is not None
    # Another recipe (here the learning rate; other data or model alike) is another key: not found.
    other_lr = dataclasses.replace(SMALL_BASE, train=dataclasses.replace(SMALL_BASE.train, lr=1e-3))
    other = builtin_base.build_recipe("amazon-rating", other_lr, **kw)
    assert other.key != recipe.key and builtin_base.find_cached(root, other)[0] is None
    more_users = builtin_base.build_recipe("amazon-rating", dataclasses.replace(SMALL_BASE, base_users=5), **kw)
    assert more_users.key != recipe.key
    # An entry filed under a key its manifest does not carry is never used.
    shutil.copytree(builtin_base.entry_dir(root, recipe), builtin_base.entry_dir(root, other))
    found, why = builtin_base.find_cached(root, other)
    assert found is None and "another recipe" in why
    svc = ClientService(dataclasses.replace(spec, builtin_base=dataclasses.replace(other_lr, when_missing="untrained")),
                        tmp_path / "d", engine=untrained)
    try:
        assert svc.host.base_info["source"] == "untrained" and "another recipe" in svc.base.untrained_why
    finally:
        svc.close()


def test_refuse_untrained_and_tasks_without_base_users(untrained, tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    refuse = dataclasses.replace(SMALL_BASE, when_missing="refuse")
    with pytest.raises(ValueError, match="oppu prepare-base-adapter"):
        ClientService(daemon_spec(tiny_model_dir, cache, builtin_base=refuse), tmp_path / "r", engine=untrained)
    # A task without base users (commit-title here, a [[tasks]] task alike) says so and names the fix.
    svc = ClientService(daemon_spec(tiny_model_dir, cache, task="commit-title"), tmp_path / "c", engine=untrained)
    try:
        svc.start()
        assert svc.base.job_id is None
        answer = svc.ask("Write the subject line of this commit: fix the tokenizer's padding side")
        assert answer["base_adapter_source"] == "untrained"
        assert any("no base users" in w and "base_adapter_dir" in w for w in answer["warnings"])
        assert any("base_adapter_dir" in p for p in svc.status()["problems"])
    finally:
        svc.close()


def save_base(engine, directory, task: str, *, seed: int) -> str:
    """A base adapter B that differs from the loaded one (its B matrices nonzero), saved as a
    coordinator delivers it; returns its version (sha256 of its weights, 12 digits)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=g) * 0.05).to(v.dtype) if ".lora_B." in k else v.clone()
             for k, v in engine.base_state().items()}
    keep = {k: v.clone() for k, v in engine.base_state().items()}
    engine.set_base_state(state)
    try:
        engine.save_base(directory, AdapterManifest(role="base", base_model_hash=engine.model_hash, task=task,
                                                    peft_type="lora", train={"round": 1}))
    finally:
        engine.set_base_state(keep)
    return json.loads((directory / ADAPTER_MANIFEST).read_text())["files"]["adapter_model.safetensors"][:12]


def history(n: int):
    return make_synthetic("synthetic-tag", n_base_users=0, n_eval_users=1, history_size=n, n_queries=1,
                          seed=5).eval_users[0]


def test_a_personal_adapter_trained_on_another_base_adapter_does_not_answer_and_is_retrained(
        untrained, tiny_model_dir, tmp_path):
    spec = daemon_spec(tiny_model_dir, tmp_path / "cache", task="synthetic-tag", selection=SelectionSpec(enabled=False),
                       builtin_base=dataclasses.replace(SMALL_BASE, when_missing="untrained"),
                       personal_train=TrainSpec(epochs=1, lr=2e-2, batch_size=4))
    svc = ClientService(spec, tmp_path / "dir", engine=untrained)
    user = history(8)
    question = user.queries[0].input
    try:
        svc.add(user.history)
        job = svc.train()
        assert svc.jobs.wait(job.id, 120).state == "succeeded"
        first = svc.ask(question)
        assert first["personal_version"] == 1 and first["method"] == "OPPU+RAG"
        assert svc.status()["personal_adapter"]["base_adapter"] == "untrained"
        # A coordinator delivers base adapter B into DIR/base_adapter.
        b = save_base(untrained, svc.dir / "base_adapter", "synthetic-tag", seed=1)
        answer = svc.ask(question)
        assert answer["personal_version"] is None and answer["method"] == "RAG", answer
        assert answer["base_adapter_version"] == b and answer["base_adapter_source"] == "coordinator"
        assert any("trained on base adapter untrained" in w and b in w for w in answer["warnings"]), answer
        status = svc.status()
        assert status["personal_adapter"]["answers"] is False
        assert "trained on base adapter untrained" in status["personal_adapter"]["not_answering_because"]
        assert any("trained on base adapter untrained" in p for p in status["problems"])
        # ... and it is retrained on B by itself.
        retrain = next(j for j in svc.jobs.list() if j.trigger == "the base adapter changed")
        assert svc.jobs.wait(retrain.id, 120).state == "succeeded"
        again = svc.ask(question)
        assert again["personal_version"] == 2 and again["method"] == "OPPU+RAG"
        assert svc.status()["personal_adapter"]["base_adapter"] == b
        assert not any("trained on base adapter" in w for w in again["warnings"])
    finally:
        svc.close()

    # At start: another base (B') is there now and the history is too small to train: it says what is needed.
    b2 = save_base(untrained, tmp_path / "dir" / "base_adapter", "synthetic-tag", seed=2)
    svc = ClientService(dataclasses.replace(spec, selection=SelectionSpec(min_train=20)), tmp_path / "dir",
                        engine=untrained)
    try:
        svc.start()
        assert svc.host.base_info["version"] == b2 and svc.jobs.active() is None
        answer = svc.ask(question)
        assert answer["personal_version"] is None
        assert any("needs at least" in w and "8 stored" in w for w in answer["warnings"]), answer
    finally:
        svc.close()


def test_an_imported_adapter_trained_on_another_base_adapter_does_not_answer(untrained, tiny_model_dir, tmp_path):
    spec = daemon_spec(tiny_model_dir, tmp_path / "cache", task="synthetic-tag", selection=SelectionSpec(enabled=False),
                       builtin_base=dataclasses.replace(SMALL_BASE, when_missing="untrained"),
                       personal_train=TrainSpec(epochs=1, lr=2e-2, batch_size=4))
    src = ClientService(spec, tmp_path / "src", engine=untrained)
    try:
        src.add(history(8).history)
        assert src.jobs.wait(src.train().id, 120).state == "succeeded"
        src.export(tmp_path / "me.tar.gz")
    finally:
        src.close()
    untrained.reset_personal()
    (tmp_path / "dst").mkdir()
    b = save_base(untrained, tmp_path / "dst" / "base_adapter", "synthetic-tag", seed=3)
    dst = ClientService(spec, tmp_path / "dst", engine=untrained)
    try:
        result = dst.import_archive(tmp_path / "me.tar.gz")
        assert result["personal_version"] == 1 and result["personal_answers"] is False
        assert b in result["personal_not_answering_because"] and result["retrain_job"]
        assert dst.jobs.wait(result["retrain_job"], 120).state == "succeeded"
        assert dst.ask(history(8).queries[0].input)["personal_version"] == 2
    finally:
        dst.close()


def test_switching_a_directory_to_another_task_drops_the_old_tasks_base_adapter(untrained, tiny_model_dir, tmp_path):
    spec = daemon_spec(tiny_model_dir, tmp_path / "cache", task="synthetic-tag",
                       builtin_base=dataclasses.replace(SMALL_BASE, when_missing="untrained"))
    svc = ClientService(spec, tmp_path / "dir", engine=untrained)
    svc.close()
    save_base(untrained, tmp_path / "dir" / "base_adapter", "synthetic-tag", seed=4)
    svc = ClientService(spec, tmp_path / "dir", engine=untrained)
    assert svc.host.base_info["source"] == "coordinator"
    svc.close()
    svc = ClientService(dataclasses.replace(spec, task="synthetic-rating"), tmp_path / "dir", engine=untrained)
    try:
        assert not (tmp_path / "dir" / "base_adapter").exists()
        assert svc.host.base_info["source"] == "untrained"
    finally:
        svc.close()
