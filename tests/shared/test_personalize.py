"""From a user's history to examples and prompts: what every method, the simulation, the
federation client and the daemon build their training data and prompts with."""

import random

from shared.config import ExperimentSpec, RetrievalSpec, load_experiment
from shared.data import make_synthetic
from shared.personalize import (Context, base_examples, ensure_profile, history_examples, population_base_examples,
                                prompt_for)
from shared.retrieval import InMemoryHistoryStore, make_retriever
from shared.tasks import get_task

TASK = get_task("synthetic-tag")


def _context(history, k=2):
    store = InMemoryHistoryStore(TASK.item_text)
    store.add(history)
    return Context(store, make_retriever("bm25", TASK.item_text), RetrievalSpec(store="memory", k=k))


def _user():
    return make_synthetic("synthetic-tag", n_base_users=2, n_eval_users=1, history_size=8, seed=1).eval_users[0]


def test_a_training_example_retrieves_only_from_earlier_history():
    user = _user()
    ctx = _context(user.history)
    examples = history_examples(TASK, user.history, ctx, "rag")
    assert [e.target for e in examples] == [TASK.item_to_example(it)[1] for it in user.history]
    for i, e in enumerate(examples):
        later = [TASK.render_item(it) for it in user.history[i:]]
        assert not any(text in e.prompt for text in later), i  # never its own or a future item
    assert examples[0].prompt == prompt_for(TASK, ctx, TASK.item_to_example(user.history[0])[0], "plain")


def test_base_examples_mix_plain_and_retrieved_prompts_reproducibly():
    user = _user()
    ctx = _context(user.history)
    first = base_examples(TASK, ctx, user.history, rng=random.Random(5))
    again = base_examples(TASK, ctx, user.history, rng=random.Random(5))
    assert [e.prompt for e in first] == [e.prompt for e in again]
    plain = {e.prompt for e in history_examples(TASK, user.history, ctx, "plain")}
    kinds = {e.prompt in plain for e in first}
    assert kinds == {True, False}  # both prompt shapes the shared adapter serves
    assert all(e.prompt in plain for e in base_examples(TASK, ctx, user.history, rng=random.Random(5),
                                                        with_context=False))
    no_k = _context(user.history, k=0)
    assert all(e.prompt in plain for e in base_examples(TASK, no_k, user.history, rng=random.Random(5)))


def test_population_base_examples_are_capped_and_retrieve_only_when_a_method_does():
    ds = make_synthetic("synthetic-tag", n_base_users=4, n_eval_users=1, history_size=8, seed=2)
    spec = load_experiment(None, ['data.task="synthetic-tag"', "data.base_examples=10", 'retrieval.store="memory"'])
    capped = population_base_examples(TASK, spec, ds.base_users)
    assert len(capped) == 10
    assert [e.prompt for e in capped] == [e.prompt for e in population_base_examples(TASK, spec, ds.base_users)]
    every = population_base_examples(TASK, load_experiment(None, ['data.task="synthetic-tag"', "data.base_examples=0",
                                                                 'methods=["non-personalized", "OPPU"]']),
                                     ds.base_users)
    assert len(every) == sum(len(u.history) for u in ds.base_users)
    plain = {e.prompt for u in ds.base_users for e in history_examples(TASK, u.history, _context(u.history), "plain")}
    assert all(e.prompt in plain for e in every)  # no method retrieves: no retrieved context
    assert isinstance(spec, ExperimentSpec)


def test_each_augmentation_puts_only_its_own_context_in_the_prompt():
    user = _user()
    ctx = _context(user.history, k=2)
    ctx.profile = "Likes quiet films about the sea."
    query = TASK.item_to_example(user.history[-1])[0]
    rendered = [TASK.render_item(it) for it in user.history]
    plain = prompt_for(TASK, ctx, query, "plain")
    rag = prompt_for(TASK, ctx, query, "rag")
    pag = prompt_for(TASK, ctx, query, "pag")
    assert not any(r in plain for r in rendered) and ctx.profile not in plain
    assert sum(r in rag for r in rendered) == 2 and ctx.profile not in rag  # k items, no profile
    assert ctx.profile in pag and sum(r in pag for r in rendered) == 2
    assert prompt_for(TASK, None, query, "rag") == plain  # no context: the plain prompt
    assert prompt_for(TASK, ctx, query, "rag", before=0) == prompt_for(TASK, _context(user.history, k=0), query, "rag")
    assert not any(r in prompt_for(TASK, ctx, query, "rag", before=0) for r in rendered)  # nothing earlier


class _ProfileWriter:
    """Stands in for the engine: answers a profile prompt and counts how often it was asked."""

    def __init__(self):
        self.calls = []

    def answer(self, prompts, *, max_new_tokens, personal, raw=False):
        self.calls.append({"prompts": list(prompts), "max_new_tokens": max_new_tokens, "personal": personal,
                           "raw": raw})
        return ["Likes comedies; writes short tags."]


def test_a_profile_is_written_once_by_the_bare_base_model_then_reused():
    user = _user()
    engine, kept = _ProfileWriter(), []
    ctx = _context(user.history)
    text = ensure_profile(engine, TASK, ctx, user.history, seed=3, keep=kept.append)
    assert text == "Likes comedies; writes short tags." and kept == [text] and ctx.profile == text
    (call,) = engine.calls
    # Free text from the bare base model: no adapter trained on the task's answer format.
    assert call["raw"] is True and call["personal"] is False
    assert call["max_new_tokens"] == ctx.spec.profile_max_tokens
    assert any(TASK.render_item(it)[:40] in call["prompts"][0] for it in user.history)

    assert ensure_profile(engine, TASK, ctx, user.history, keep=kept.append) == text  # the context's
    fresh = _context(user.history)
    fresh.store.set_profile("Cached in the store.")
    assert ensure_profile(engine, TASK, fresh, user.history, keep=kept.append) == "Cached in the store."
    assert len(engine.calls) == 1 and len(kept) == 1  # generated once, kept once

    default = _context(user.history)
    ensure_profile(_ProfileWriter(), TASK, default, user.history)  # without `keep`: kept in the store
    assert default.store.get_profile() == "Likes comedies; writes short tags."
