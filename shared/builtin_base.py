"""Built-in base adapters: for a task whose data source has base users (shared.data.sources:
amazon-rating, amazon-title, the synthetic tasks, LaMP tasks given a LaMP directory), the shared
base adapter trained once on this machine with the experiments' recipe
(shared.personalize.population_base_examples + Engine.train_base, as simulations/experiment.py
trains it) and cached beside the converted base model (`oppu prepare-model`):

    <cache>/base-adapters/<task>/<key[:16]>/   PEFT files + oppu_adapter.json (role "base";
                                                train.recipe_key is the whole key)
    <cache>/base-adapters/<task>/.lock          flock: one machine trains a task's adapter once

<cache> is base_model.cache_dir, else $OPPU_CACHE or ~/.cache/oppu (shared.model_source.cache_root).
The key is a sha256 over the task, the base model's hash, the adapter and training settings and
the training examples themselves (prompt and answer of each), so other data, another retrieval
setting (it shapes the prompts), another model or another recipe is another entry; an entry whose
manifest does not carry exactly the key it is filed under is never used.

Used by the daemon (client/service.py) and by `oppu prepare-base-adapter` (oppu/cli.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .adapters import AdapterManifest, verify_adapter_dir
from .config import AdapterSpec, BaseModelSpec, BuiltinBaseSpec, DataSpec, ExperimentSpec, RetrievalSpec, TrainSpec
from .data.sources import REAL_TASKS, SYNTHETIC_TASKS, load_dataset
from .fileio import locked_dir
from .model_source import cache_root
from .personalize import population_base_examples
from .tasks import get_task
from .training import Example

log = logging.getLogger(__name__)

CACHE_DIR = "base-adapters"
KEY_FORMAT = 1  # bump when what the key covers changes


class NoBaseUsers(ValueError):
    """The task has no base users here, so no built-in base adapter can be trained for it."""


@dataclass(frozen=True)
class Recipe:
    """Everything one built-in base adapter is trained from, and the key it is cached under."""

    task: str
    model_hash: str
    examples: tuple[Example, ...]
    users: int
    data_source: str  # where the base users came from (TaskDataset.source)
    train: TrainSpec
    base_adapter: AdapterSpec
    key: str

    def describe(self) -> str:
        steps = self.train.epochs * len(self.examples) / self.train.batch_size
        return (f"{self.task}: {len(self.examples)} examples from {self.users} base users ({self.data_source}), "
                f"about {steps:.0f} steps at lr {self.train.lr:g}")


def has_base_users(task: str, spec: BuiltinBaseSpec) -> str | None:
    """None when shared.data.sources can load base users for `task`, else why not (for a person)."""
    if task in REAL_TASKS or task in SYNTHETIC_TASKS or Path(spec.source).is_dir():
        return None
    return (f"task {task!r} has no base users the project can train a base adapter from (only "
            f"{', '.join(REAL_TASKS + SYNTHETIC_TASKS)} have, and LaMP tasks with builtin_base.source set to a LaMP "
            "directory); name a trained base adapter for it with base_adapter_dir = \"/path/to/base_adapter\" "
            "(e.g. an experiment's RUN_DIR/base_adapter)")


def experiment_spec(task: str, spec: BuiltinBaseSpec, *, base_model: BaseModelSpec, base_adapter: AdapterSpec,
                    retrieval: RetrievalSpec) -> ExperimentSpec:
    """The experiment whose base adapter this is: its data, the daemon's model, adapter and
    retrieval (which shapes the prompts the base adapter learns), the built-in training."""
    data = dataclasses.replace(DataSpec(), task=task, source=spec.source, data_dir=spec.data_dir,
                               base_users=spec.base_users, base_examples=spec.base_examples)
    return ExperimentSpec(data=data, base_model=base_model, base_adapter=base_adapter, base_train=spec.train,
                          retrieval=dataclasses.replace(retrieval, store="memory"))


def build_recipe(task: str, spec: BuiltinBaseSpec, *, model_hash: str, base_model: BaseModelSpec,
                 base_adapter: AdapterSpec, retrieval: RetrievalSpec) -> Recipe:
    """Load the task's base users and build the training examples; NoBaseUsers when there are none."""
    why = has_base_users(task, spec)
    if why:
        raise NoBaseUsers(why)
    exp = experiment_spec(task, spec, base_model=base_model, base_adapter=base_adapter, retrieval=retrieval)
    try:
        ds = load_dataset(exp.data)
    except (FileNotFoundError, ValueError) as e:
        raise NoBaseUsers(f"the base users of {task!r} cannot be read: {e}") from None
    if ds.task != task:  # the synthetic stand-in of a real task whose files are missing
        raise NoBaseUsers(f"the data of {task!r} is not on this machine ({'; '.join(ds.notes) or ds.source}); set "
                          "OPPU_DATA_DIR or builtin_base.data_dir to the directory holding it, or name a trained base "
                          "adapter with base_adapter_dir")
    if not ds.base_users:
        raise NoBaseUsers(f"{task!r} has no base users with builtin_base.base_users={spec.base_users}")
    examples = tuple(population_base_examples(get_task(task), exp, ds.base_users))
    key = recipe_key(task, model_hash, examples, spec.train, base_adapter)
    return Recipe(task, model_hash, examples, len(ds.base_users), ds.source, spec.train, base_adapter, key)


def recipe_key(task: str, model_hash: str, examples: Sequence[Example], train: TrainSpec,
               base_adapter: AdapterSpec) -> str:
    data = hashlib.sha256()
    for ex in examples:
        data.update(json.dumps([ex.prompt, ex.target]).encode())
    fingerprint = {"format": KEY_FORMAT, "task": task, "model": model_hash, "examples": data.hexdigest(),
                   "train": dataclasses.asdict(train), "adapter": dataclasses.asdict(base_adapter)}
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def cache_dir(base_model: BaseModelSpec) -> Path:
    """Where built-in base adapters are cached: next to the converted models."""
    return cache_root(base_model) / CACHE_DIR


def entry_dir(root: Path, recipe: Recipe) -> Path:
    return Path(root) / recipe.task / recipe.key[:16]


def find_cached(root: Path, recipe: Recipe) -> tuple[Path | None, str | None]:
    """(the cached adapter for `recipe`, None) or (None, why there is none usable)."""
    d = entry_dir(root, recipe)
    if not d.is_dir():
        return None, f"no built-in base adapter cached for {recipe.task} under {d.parent}"
    try:
        m = verify_adapter_dir(d, base_model_hash=recipe.model_hash)
    except (OSError, ValueError) as e:
        return None, f"{d} is not usable ({e})"
    if m.role != "base" or m.task != recipe.task or m.train.get("recipe_key") != recipe.key:
        return None, (f"{d} was trained for another recipe (role {m.role!r}, task {m.task!r}, key "
                      f"{str(m.train.get('recipe_key'))[:16]}), not {recipe.key[:16]}")
    return d, None


def prepare(engine: Any, recipe: Recipe, root: Path, *, on_phase: Callable[[str], None] = lambda _: None,
            on_step: Callable[[int, int, float], None] | None = None,
            should_stop: Callable[[], bool] | None = None, progress: bool | str = False) -> Path | None:
    """The cached adapter for `recipe`, trained into `engine`'s base slot and saved when missing
    (another process preparing the same task is waited for). Returns None when `should_stop` cut the
    training short (nothing is cached then). The engine's base slot holds the adapter afterwards,
    whether it was trained or loaded."""
    if engine.model_hash != recipe.model_hash:
        raise ValueError(f"the recipe is for base model {recipe.model_hash[:12]}, the engine holds "
                         f"{engine.model_hash[:12]}")
    with locked_dir(Path(root) / recipe.task):
        found, why = find_cached(root, recipe)
        if found is not None:
            on_phase(f"loading the cached base adapter {found}")
            engine.load_base(found)
            return found
        log.info("built-in base adapter: %s; training it: %s", why, recipe.describe())
        on_phase(f"training the {recipe.task} base adapter on {len(recipe.examples)} examples from "
                 f"{recipe.users} base users")
        t0 = time.perf_counter()
        with engine.lock:
            before = engine.base_state()
            before = {k: v.detach().clone() for k, v in before.items()}
            result = engine.train_base(list(recipe.examples), recipe.train, progress=progress, on_step=on_step,
                                       should_stop=should_stop)
            if result.cancelled:
                engine.set_base_state(before)  # a half-trained adapter answers nothing
                return None
            target = entry_dir(root, recipe)
            on_phase(f"saving it to {target}")
            engine.save_base(target, AdapterManifest(
                role="base", base_model_hash=recipe.model_hash, task=recipe.task,
                peft_type=recipe.base_adapter.peft_type,
                data={"users": recipe.users, "examples": len(recipe.examples)},
                train={"recipe_key": recipe.key, "builtin": True, "data_source": recipe.data_source,
                       "steps": result.steps, "final_loss": result.final_loss, "epochs": recipe.train.epochs,
                       "lr": recipe.train.lr, "seconds": round(time.perf_counter() - t0, 1)}))
        log.info("built-in base adapter for %s: %d steps, loss %.3f, %.0f s; cached in %s", recipe.task,
                 result.steps, result.final_loss, time.perf_counter() - t0, target)
        return target
