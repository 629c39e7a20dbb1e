"""The daemon's one model, shared by answering and training, and what its personal slot holds.

The Engine (base model loaded once, the shared base adapter, one personal slot) is used by
request threads (answers) and by the training job thread; `engine.lock` serializes them.
Answering has priority:

- Between two optimizer steps the trainer checks whether answers are waiting. If so it releases
  the lock completely, waits until the answers queued at that moment are done, then takes the
  model back for its next step while newcomers queue behind it. An answer therefore waits for at
  most one training step, and a steady stream of answers still lets training advance.
- While training, the slot holds weights in the making. An answer given then swaps the published
  version's weights in and the training weights back afterwards (in place, so the optimizer's
  references stay valid): every answer comes from exactly the version it reports. Answers do
  not touch the random state training uses, so interleaving does not change what it learns.

The published version comes from `client.personal.PersonalAdapters`; a version another process
published (the Flower ClientApp) is picked up when CURRENT changes, and a new shared base
adapter in the data directory when its manifest changes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from shared import adapters
from shared.adapters import ADAPTER_MANIFEST

from .personal import PersonalAdapters, Published, version_name

log = logging.getLogger(__name__)

MAX_YIELD_S = 30.0  # longest the trainer waits for the answers queued before it yielded


def _clone(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in state.items()}


class ModelHost:
    def __init__(self, engine: Any, personal: PersonalAdapters, base_dir: Path, *, base_required: bool = False) -> None:
        self.engine = engine
        self.personal = personal
        self.base_dir = Path(base_dir)
        self.problems: deque[str] = deque(maxlen=20)
        self._turns = threading.Condition()
        self._waiting = 0  # answers waiting for (or holding) the model
        self._issued = self._done = 0  # answers ever queued / finished: the trainer's yield target
        self._trainer_claim = False  # the trainer is taking the model back for one step
        self.training = False  # the slot holds weights being trained
        self.published: Published | None = None
        self._published_state: dict[str, Any] | None = None
        self._seen_current: int | None = None
        self.base_info: dict[str, Any] = {"version": "untrained", "path": None}
        self._base_stamp: int | None = None
        self.load_base_adapter(required=base_required)
        self.load_published()

    # -- turns ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def model_turn(self) -> Iterator[None]:
        """Hold the model for an answer (or another short operation) ahead of training."""
        with self._turns:
            self._turns.wait_for(lambda: not self._trainer_claim)
            self._issued += 1
            self._waiting += 1
        try:
            with self.engine.lock:
                yield
        finally:
            with self._turns:
                self._waiting -= 1
                self._done += 1
                self._turns.notify_all()

    def _yield_to_answers(self) -> None:
        """The trainer, between steps, holding engine.lock: serve the answers waiting now."""
        with self._turns:
            if self._waiting == 0:
                return
            target = self._issued
        lock, depth = self.engine.lock, 0
        while True:  # release every level this thread holds (train_personal nests the RLock)
            try:
                lock.release()
            except RuntimeError:
                break
            depth += 1
        try:
            with self._turns:
                self._turns.wait_for(lambda: self._done >= target, timeout=MAX_YIELD_S)
                self._trainer_claim = True
        finally:
            for _ in range(depth):
                lock.acquire()
            with self._turns:
                self._trainer_claim = False
                self._turns.notify_all()
            self.engine.resume_personal_training()  # an answer in between reset it

    # -- adapters ------------------------------------------------------------------------------

    def load_base_adapter(self, *, required: bool = False) -> None:
        """(Re)load the shared base adapter when its manifest appeared or changed."""
        mf = self.base_dir / ADAPTER_MANIFEST
        try:
            stamp = mf.stat().st_mtime_ns
        except FileNotFoundError:
            if required:
                raise FileNotFoundError(f"{self.base_dir} holds no saved adapter ({ADAPTER_MANIFEST} missing)") from None
            return
        if stamp == self._base_stamp:
            return
        self._base_stamp = stamp
        try:
            with self.model_turn():
                manifest = self.engine.load_base(self.base_dir)
        except (OSError, ValueError) as e:
            msg = f"base adapter {self.base_dir} not loaded: {e}"
            if required:
                raise ValueError(msg) from None
            log.error("%s", msg)
            self.problems.append(msg)
            return
        self.base_info = {"version": manifest.files.get("adapter_model.safetensors", "")[:12] or "unknown",
                          "path": str(self.base_dir), "created": manifest.created, "task": manifest.task,
                          "data": dict(manifest.data)}
        log.info("base adapter %s loaded from %s", self.base_info["version"], self.base_dir)

    def load_published(self) -> None:
        """Load CURRENT, or the newest older version that verifies and loads, into the slot."""
        self._seen_current = self.personal.current_version()
        found, problems = self.personal.resolve(base_model_hash=self.engine.model_hash)
        with self.model_turn():
            while found is not None:
                try:
                    self.engine.load_personal(found.path)  # safetensors; keys and shapes checked
                    break
                except (OSError, ValueError) as e:
                    problems.append(f"{version_name(found.version)}: {e}")
                    found = self._older_verified(found.version, problems)
            if found is None:
                self.engine.reset_personal()
                self.published, self._published_state = None, None
            else:
                self.published, self._published_state = found, _clone(self.engine.personal_state())
        for p in problems:
            log.error("personal adapter skipped: %s", p)
            self.problems.append(p)
        if found is not None and found.version != self._seen_current:
            log.warning("answering with %s: newer versions failed verification", version_name(found.version))

    def _older_verified(self, version: int, problems: list[str]) -> Published | None:
        for v in reversed([v for v in self.personal.versions() if v < version]):
            try:
                m = adapters.verify_adapter_dir(self.personal.path(v), base_model_hash=self.engine.model_hash)
                return Published(v, self.personal.path(v), m)
            except (OSError, ValueError) as e:
                problems.append(f"{version_name(v)}: {e}")
        return None

    def refresh(self) -> None:
        """Pick up what another process published into the data directory (not mid-training)."""
        if self.training:
            return
        self.load_base_adapter()
        if self.personal.current_version() != self._seen_current:  # re-verify only on change
            self.load_published()

    def _restore_published(self) -> None:
        """Put the published weights back in the slot (caller holds engine.lock)."""
        if self._published_state is not None:
            self.engine.set_personal_state(self._published_state, label=str(self.published.path))
        else:
            self.engine.reset_personal()

    def _adopt(self, version: int) -> None:
        """The slot's weights were just published as `version` (caller holds engine.lock)."""
        self._seen_current = version
        self.published = Published(version, self.personal.path(version), self.personal.manifest_for(version))
        self._published_state = _clone(self.engine.personal_state())
        self.engine.personal_loaded = str(self.published.path)

    # -- answering -----------------------------------------------------------------------------

    def answer(self, prompt: str, *, personal: bool, max_new_tokens: int) -> tuple[str, Published | None, float]:
        """(text, the version that answered or None, seconds waited for the model)."""
        import time

        t0 = time.perf_counter()
        with self.model_turn():
            waited = time.perf_counter() - t0
            published = self.published if personal else None
            if published is not None and self.training:
                stash = _clone(self.engine.personal_state())
                self.engine.set_personal_state(self._published_state, label=str(published.path))
                try:
                    text = self.engine.answer([prompt], max_new_tokens=max_new_tokens, personal=True)[0]
                finally:
                    self.engine.set_personal_state(stash, label="training")
            else:
                text = self.engine.answer([prompt], max_new_tokens=max_new_tokens, personal=published is not None)[0]
        return text, published, waited

    # -- training ------------------------------------------------------------------------------

    def train(self, task: Any, examples: Sequence[Any], spec: Any, selection: Any, *,
              on_step: Callable[[int, int, float], None], cancelled: Callable[[], bool],
              manifest: Callable[[Any, Any], Any]) -> tuple[Any, Any, int | None]:
        """THE training loop with per-user validation (shared.selection.train_and_select) in the
        slot, yielding to answers between steps; publishes the adapter when it is adopted (not
        cancelled, beat the base on validation). Returns (TrainResult, Selection, version or
        None). `manifest(result, selection)` builds the AdapterManifest to save with it."""
        from shared.selection import train_and_select

        def should_stop() -> bool:
            if not cancelled():
                self._yield_to_answers()
            return cancelled()

        self.training = True
        try:
            result, sel = train_and_select(self.engine, task, examples, spec, selection, progress=False,
                                           on_step=on_step, should_stop=should_stop)
        except BaseException:
            with self.engine.lock:
                self._restore_published()
                self.training = False
            raise
        with self.engine.lock:
            try:
                if not sel.adopted:  # the version in use (if any) keeps answering
                    self._restore_published()
                    return result, sel, None
                m = manifest(result, sel)
                version = self.personal.publish(lambda target: self.engine.save_personal(target, m))
                self._adopt(version)
                return result, sel, version
            except BaseException:
                self._restore_published()
                raise
            finally:
                self.training = False

    # -- import / forget -----------------------------------------------------------------------

    def stage_adapter(self, directory: Path, manifest: Any) -> int:
        """Check that a verified adapter directory loads into the slot and save it as a new,
        unpublished version (client.personal.PersonalAdapters.stage); the slot goes back to the
        published weights, so answers are unchanged until `publish_staged`."""
        with self.model_turn():
            if self.training:
                raise RuntimeError("a training job holds the personal slot")
            try:
                self.engine.load_personal(directory)
                return self.personal.stage(lambda target: self.engine.save_personal(target, manifest))
            finally:
                self._restore_published()

    def publish_staged(self, version: int) -> int:
        """Publish a staged version and answer with it; returns its (possibly renumbered) version."""
        with self.model_turn():
            version = self.personal.publish_staged(version)
        self.load_published()
        return version

    def discard_staged(self, version: int) -> None:
        self.personal.discard(version)

    def roll_back(self, version: int) -> None:
        self.personal.set_current(version)
        self.load_published()

    def forget(self) -> list[str]:
        """Delete every personal version and reset the slot; returns the versions deleted."""
        with self.model_turn():
            versions = self.personal.forget()
            self.engine.reset_personal()
            self.published, self._published_state, self._seen_current = None, None, None
        return versions
