"""The real-model setup of the personalization tests on planted preferences: one synthetic user
whose history favours a tag, a base adapter trained on other users' histories so that what a
personal adapter adds is personal, and that user's accuracy without a personal adapter, the
figure to beat (tests/simulations/test_experiment.py, tests/shared/test_personal_selection.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from shared.config import RetrievalSpec, TrainSpec, load_experiment
from shared.data import load_dataset
from shared.personalize import Context, history_examples, population_base_examples, prompt_for
from shared.records import TaskDataset, UserData
from shared.retrieval import InMemoryHistoryStore, make_retriever
from shared.tasks import get_task
from shared.training import Example


def answer_accuracy(engine: Any, task: Any, prompts: Sequence[str], queries: Sequence[Any], *, personal: bool) -> float:
    answers = engine.answer(prompts, max_new_tokens=task.max_new_tokens, personal=personal)
    return task.score([task.parse_output(a) for a in answers], [q.target for q in queries])["accuracy"]


@dataclass(frozen=True)
class PlantedUser:
    task: Any
    dataset: TaskDataset
    user: UserData
    prompts: list[str]  # the user's queries as plain prompts
    baseline: float  # accuracy on them with the base adapter only

    def accuracy(self, engine: Any, *, personal: bool) -> float:
        return answer_accuracy(engine, self.task, self.prompts, self.user.queries, personal=personal)


def planted_user(engine: Any, *, seed: int, base_examples: int, base_train: TrainSpec) -> PlantedUser:
    """Train `engine`'s base adapter on 12 other users (`base_examples` examples, `base_train`), then
    measure the first synthetic-tag user of data seed `seed` (20 history items, 10 queries)."""
    spec = load_experiment(None, [
        'data.task="synthetic-tag"', 'data.source="synthetic"', "data.users=1", "data.base_users=12",
        "data.queries=10", "data.min_history=20", "data.max_history=20", f"data.seed={seed}",
        f"data.base_examples={base_examples}", 'retrieval.store="memory"',
    ])
    ds = load_dataset(spec.data)
    task = get_task(ds.task)
    user = ds.eval_users[0]
    engine.train_base(population_base_examples(task, spec, ds.base_users), base_train, progress=False)
    prompts = [prompt_for(task, None, q.input, "plain") for q in user.queries]
    return PlantedUser(task, ds, user, prompts, answer_accuracy(engine, task, prompts, user.queries, personal=False))


def plain_history_examples(task: Any, user: UserData) -> list[Example]:
    """A user's training examples as personalization renders them: plain prompts, each item's
    earlier history retrievable by BM25 from an in-memory store of the user's own history."""
    store = InMemoryHistoryStore(task.item_text)
    store.add(user.history)
    ctx = Context(store, make_retriever("bm25", task.item_text), RetrievalSpec(store="memory"))
    return history_examples(task, user.history, ctx, "plain")
