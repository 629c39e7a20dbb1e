"""The daemon's built-in base adapter: when no base adapter is named (base_adapter_dir) or was
received (DIR/base_adapter), the one cached for the task, model and recipe (shared.builtin_base),
else what builtin_base.when_missing says: train it as a job at the daemon's start, refuse to
start, or answer with an untrained one, and say why wherever the daemon reports (status, every
answer). Which of these answers is ModelHost's choice (client/host.py); this sets its
`builtin_dir` and keeps the reason for an untrained one.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

from shared import builtin_base

from .host import UNTRAINED, ModelHost
from .jobs import JobControl, JobRegistry
from .settings import DaemonSpec

log = logging.getLogger(__name__)


class Preparing(RuntimeError):
    """The base adapter is being prepared (its job is running): asking waits for it."""

    def __init__(self, message: str, job: Any) -> None:
        super().__init__(message)
        self.job = job


class BuiltinBase:
    def __init__(self, spec: DaemonSpec, data_dir: Path, engine: Any, host: ModelHost, jobs: JobRegistry) -> None:
        self.spec, self.dir, self.engine, self.host, self.jobs = spec, Path(data_dir), engine, host, jobs
        self.untrained_why: str | None = None  # why the base adapter answering is untrained
        self.recipe: builtin_base.Recipe | None = None  # to train at start (when_missing = "train")
        self.job_id: str | None = None

    def choose(self) -> None:
        """No base adapter named or received: the cached built-in one, else when_missing's way."""
        spec, bb, task = self.spec, self.spec.builtin_base, self.host.task
        try:
            recipe = builtin_base.build_recipe(task, bb, model_hash=self.engine.model_hash, base_model=spec.base_model,
                                               base_adapter=spec.base_adapter, retrieval=spec.retrieval)
        except builtin_base.NoBaseUsers as e:
            if bb.when_missing == "refuse":
                raise ValueError(f"no base adapter for {task}: {e}") from None
            self._untrained(str(e))
            return
        found, why = builtin_base.find_cached(builtin_base.cache_dir(spec.base_model), recipe)
        if found is not None:
            self.host.builtin_dir = found
            self.host.load_base_adapter()
            return
        prepare = f"`oppu prepare-base-adapter --data-dir {self.dir}` trains and caches it ({recipe.describe()})"
        if spec.coordinator:
            self._untrained(f"the coordinator has not sent its base adapter yet, and {why}; {prepare}")
        elif bb.when_missing == "refuse":
            raise ValueError(f"{why}, and builtin_base.when_missing = \"refuse\": {prepare}, or set "
                             "builtin_base.when_missing = \"train\" to train it when the daemon starts")
        elif bb.when_missing == "untrained":
            self._untrained(f"builtin_base.when_missing = \"untrained\" and {why}; {prepare}")
        else:
            self.recipe = recipe
            self._untrained(f"{why}; it is trained when the daemon starts ({recipe.describe()})", expected=True)

    def _untrained(self, why: str, *, expected: bool = False) -> None:
        self.untrained_why = why
        log.log(logging.INFO if expected else logging.WARNING, "base adapter untrained: %s", why)

    def start(self, *, then: Callable[[], None]) -> bool:
        """Start the job that trains it when choose() left one to train; `then()` runs once the job
        succeeded (a job cannot start the next one from inside itself: one at a time). False when
        there is nothing to train."""
        recipe = self.recipe
        if recipe is None:
            return False
        job = self.jobs.submit("base-adapter", lambda ctl: self._job(ctl, recipe), trigger="first start",
                               params={"task": recipe.task, "examples": len(recipe.examples), "users": recipe.users,
                                       "epochs": recipe.train.epochs, "lr": recipe.train.lr})
        self.job_id = job.id
        log.info("preparing the built-in base adapter: job %s (%s)", job.id, recipe.describe())

        def after() -> None:
            done = self.jobs.wait(job.id)
            if done is not None and done.state == "failed":
                self.untrained_why = (f"preparing the built-in base adapter failed (job {job.id}: {done.error}); "
                                      "DIR/logs/daemon.log says more; restart the daemon to try again")
            elif done is not None and done.state == "succeeded":
                then()

        threading.Thread(target=after, name="oppu-after-base-job", daemon=True).start()
        return True

    def _job(self, ctl: JobControl, recipe: builtin_base.Recipe) -> dict[str, Any]:
        ctl.set_phase(f"preparing the {recipe.task} base adapter ({recipe.describe()})")
        path = builtin_base.prepare(self.engine, recipe, builtin_base.cache_dir(self.spec.base_model),
                                    on_phase=ctl.set_phase, on_step=ctl.progress, should_stop=ctl.cancelled)
        if path is None:
            self.untrained_why = (f"preparing the built-in base adapter was cancelled (job {ctl.job.id}); restart the "
                                  f"daemon or run `oppu prepare-base-adapter --data-dir {self.dir}`")
            return {"cancelled": True}
        self.host.builtin_dir = path
        self.host.load_base_adapter()
        if self.host.base_info["source"] != UNTRAINED:
            self.untrained_why = None
        self.recipe = None
        return {"base_adapter": self.host.base_info["version"], "path": str(path), "examples": len(recipe.examples),
                "users": recipe.users}

    def preparing(self) -> Any:
        """The job preparing the base adapter while it runs, else None."""
        job = self.jobs.active()
        return job if job is not None and job.id == self.job_id else None

    def status(self) -> dict[str, Any]:
        info = dict(self.host.base_info)
        if info["source"] == UNTRAINED:
            job = self.preparing()
            info["untrained_because"] = self.untrained_why
            info["preparing_job"] = job.id if job is not None else None
        return info
