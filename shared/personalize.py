"""From a user's history to training examples and prompts, for every method.

Methods differ only in what goes into the prompt and whether the personal adapter is active:

| method            | context in prompt            | adapters                  |
|-------------------|------------------------------|---------------------------|
| non-personalized  | none                         | base                      |
| RAG               | k retrieved history items    | base                      |
| PAG               | profile + k retrieved items  | base                      |
| OPPU              | none                         | base + personal(plain)    |
| OPPU+RAG          | k retrieved items            | base + personal(RAG)      |
| OPPU+PAG          | profile + k retrieved items  | base + personal(PAG)      |

As in the paper, the personal adapter of OPPU+RAG / OPPU+PAG is trained on prompts augmented
the same way it will be queried. Training example i retrieves only from history before i, so
a user's training never sees their own future.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# The method table lives with the config's METHODS; importers of this module also find it here.
from .config import AUGMENTATIONS, METHOD_AUGMENTATION, PERSONAL_METHODS, ExperimentSpec, RetrievalSpec  # noqa: F401
from .prompting import build_prompt, clip_words
from .records import HistoryItem, UserData
from .retrieval import InMemoryHistoryStore, make_retriever
from .training import Example



@dataclass
class Context:
    """What a prompt may draw on for one user: their store, a retriever, their profile."""

    store: Any  # shared.retrieval.HistoryStore
    retriever: Any  # object with retrieve(store, query, k, before=...)
    spec: RetrievalSpec
    profile: str | None = None


def retrieve_for(task: Any, ctx: Context, query_input: str, before: int | None) -> list[HistoryItem]:
    if ctx.spec.k <= 0 or (before is not None and before <= 0):
        return []
    return ctx.retriever.retrieve(ctx.store, task.retrieval_query(query_input), ctx.spec.k, before=before)


def prompt_for(task: Any, ctx: Context | None, query_input: str, augmentation: str, *, before: int | None = None) -> str:
    """The prompt for one query under an augmentation ("plain" | "rag" | "pag")."""
    if augmentation == "plain" or ctx is None:
        return build_prompt(task, query_input)
    retrieved = retrieve_for(task, ctx, query_input, before)
    profile = ctx.profile if augmentation == "pag" else None
    return build_prompt(task, query_input, retrieved, profile, item_max_words=ctx.spec.item_max_words,
                        item_format=ctx.spec.item_format)


def history_examples(task: Any, history: Sequence[HistoryItem], ctx: Context | None, augmentation: str) -> list[Example]:
    """Training pairs from a user's own history; item i only sees items before it."""
    out = []
    for i, item in enumerate(history):
        query_input, target = task.item_to_example(item)
        out.append(Example(prompt_for(task, ctx, query_input, augmentation, before=i), target))
    return out


def profile_prompt(task: Any, history: Sequence[HistoryItem], n_items: int, seed: int, item_max_words: int) -> str:
    rng = random.Random(seed)
    sample = list(history) if len(history) <= n_items else rng.sample(list(history), n_items)
    lines = "\n".join(f"- {clip_words(task.render_item(it), item_max_words)}" for it in sample)
    return (
        f"Here are items from one user's history:\n{lines}\n\n"
        "In two short sentences, describe this user's tastes, habits and writing style."
    )


def ensure_profile(engine: Any, task: Any, ctx: Context, history: Sequence[HistoryItem], *, seed: int = 0,
                   keep: Callable[[str], None] | None = None) -> str:
    """The user's profile (PAG): the context's, else the one cached in their store, else generated
    once by the base model and kept by `keep` (default: in the store). A federated client keeps
    it in its own directory instead: the store belongs to the daemon process."""
    if ctx.profile:
        return ctx.profile
    cached = ctx.store.get_profile()
    if cached:
        ctx.profile = cached
        return cached
    prompt = profile_prompt(task, history, ctx.spec.profile_items, seed, ctx.spec.item_max_words)
    text = engine.answer([prompt], max_new_tokens=ctx.spec.profile_max_tokens, personal=False, raw=True)[0]
    (keep or ctx.store.set_profile)(text)
    ctx.profile = text
    return text


def base_examples(task: Any, ctx: Context, history: Sequence[HistoryItem], *, rng: random.Random,
                  with_context: bool = True) -> list[Example]:
    """One user's history as training examples for the shared base adapter.

    The base adapter serves every method, so it sees both prompt shapes: plain, and (for about
    half the items after the first, when `with_context` and retrieval is on) with items retrieved
    from the same user's earlier history. Profiles are left out: writing one per user would cost a
    generation pass each. Used by a federated client for its local update and, through
    `population_base_examples`, by the simulation and the coordinator.
    """
    out = []
    for i, item in enumerate(history):
        query_input, target = task.item_to_example(item)
        aug = "rag" if with_context and i > 0 and ctx.spec.k > 0 and rng.random() < 0.5 else "plain"
        out.append(Example(prompt_for(task, ctx, query_input, aug, before=i), target))
    return out


def population_base_examples(task: Any, spec: ExperimentSpec, users: Sequence[UserData]) -> list[Example]:
    """Base-adapter training data from users who are never evaluated (simulations, and the
    coordinator's initial base adapter): every user's `base_examples` (retrieved context only
    when some method of `spec` retrieves), shuffled together with `spec.data.seed`, at most
    `spec.data.base_examples` of them (0: all)."""
    rng = random.Random(spec.data.seed)
    wants_context = any(METHOD_AUGMENTATION.get(m, "plain") != "plain" for m in spec.methods)
    examples: list[Example] = []
    for u in users:
        store = InMemoryHistoryStore(task.item_text)
        store.add(u.history)
        ctx = Context(store, make_retriever("bm25", task.item_text), spec.retrieval)
        examples += base_examples(task, ctx, u.history, rng=rng, with_context=wants_context)
    rng.shuffle(examples)
    return examples[: spec.data.base_examples] if spec.data.base_examples else examples
