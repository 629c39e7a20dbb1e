"""The centralized baseline: one adapter trained on the pooled histories of all evaluated users.

This is what a federated-learning paper compares against: the utility one would get if every
user's data were sent to one server. The adapter sits in the engine's personal slot, stacked on
the shared base adapter (so it also has "whatever the base adapter saw"), is trained with THE
training loop (Engine.train_personal) and answers through THE inference path (Engine.answer)
with plain prompts, like OPPU, so the two differ only in whose data trained the adapter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from shared.adapters import AdapterManifest
from shared.config import ExperimentSpec
from shared.personalize import history_examples, prompt_for
from shared.records import UserData
from shared.training import Example

METHOD = "centralized"


@dataclass
class CentralizedResult:
    predictions: dict[str, dict[str, str]] = field(default_factory=dict)  # user id -> qid -> answer
    train: dict[str, float] = field(default_factory=dict)


def pooled_examples(task: Any, users: Sequence[UserData], *, seed: int) -> list[Example]:
    """Every evaluated user's history as training pairs (plain prompts), shuffled together."""
    examples = [ex for u in users for ex in history_examples(task, u.history, None, "plain")]
    random.Random(seed).shuffle(examples)
    return examples


def run_centralized(engine: Any, task: Any, spec: ExperimentSpec, users: Sequence[UserData],
                    save_to: Path | None = None, *, progress: bool | str = False) -> CentralizedResult:
    """Train the pooled adapter (fresh personal slot) and answer every user's queries with it."""
    examples = pooled_examples(task, users, seed=spec.personal_train.seed)
    tr = engine.train_personal(examples, spec.personal_train, fresh=True, progress=progress)
    out = CentralizedResult(train={"examples": len(examples), "users": len(users), "steps": tr.steps,
                                   "final_loss": tr.final_loss, "seconds": tr.seconds,
                                   "tokens_per_second": tr.tokens_per_second})
    for u in users:
        prompts = [prompt_for(task, None, q.input, "plain") for q in u.queries]
        answers = engine.answer(prompts, max_new_tokens=engine.answer_tokens(task, u.history), personal=True,
                                task=task)
        out.predictions[u.user_id] = {q.id: task.parse_output(a) for q, a in zip(u.queries, answers)}
    if save_to is not None:
        engine.save_personal(save_to, AdapterManifest(
            role="centralized", base_model_hash=engine.model_hash, task=task.name,
            peft_type=spec.personal_adapter.peft_type,
            data={"users": len(users), "examples": len(examples)},
            train={"steps": tr.steps, "final_loss": tr.final_loss},
        ))
    engine.reset_personal()
    return out
