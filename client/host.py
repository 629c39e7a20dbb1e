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

Which base adapter answers, first found wins (`base_info["source"]` says which):

    base_adapter_dir   the one the user named (daemon.base_adapter_dir); nothing else is looked at
    coordinator        DIR/base_adapter, the federation's, written when a coordinator sends one
    builtin            the cached built-in one for the task (shared.builtin_base), set by the service
    untrained          none of these: a fresh, untrained adapter; the service says why in every answer

A personal adapter knows the base adapter it was trained on (its manifest's train.base_adapter,
the version `shared.adapters.adapter_version` names), whether the daemon or a federated round's
ClientApp trained it.
Stacked on another one it would add corrections learned for weights that are no longer there, so
while they differ it does not answer (`stale` says why) until a new one is trained on this base.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from shared import adapters
from shared.adapters import ADAPTER_MANIFEST, TRAINED_ON, adapter_version
from shared.selection import train_and_select

from .personal import PersonalAdapters, Published, version_name

log = logging.getLogger(__name__)

MAX_YIELD_S = 30.0  # longest the trainer waits for the answers queued before it yielded
UNTRAINED = "untrained"  # the version and source of a base adapter that was never trained


def _clone(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in state.items()}


class ModelHost:
    def __init__(self, engine: Any, personal: PersonalAdapters, *, task: str, received_dir: Path,
                 named_dir: Path | None = None, builtin_dir: Path | None = None) -> None:
        self.engine = engine
        self.personal = personal
        self.task = task
        self.named_dir = Path(named_dir) if named_dir is not None else None
        self.received_dir = Path(received_dir)
        self.builtin_dir = Path(builtin_dir) if builtin_dir is not None else None
        self.stale: str | None = None  # why the published personal adapter does not answer
        self.problems: deque[str] = deque(maxlen=20)
        self._turns = threading.Condition()
        self._waiting = 0  # answers waiting for (or holding) the model
        self._issued = self._done = 0  # answers ever queued / finished: the trainer's yield target
        self._trainer_claim = False  # the trainer is taking the model back for one step
        self.training = False  # the slot holds weights being trained
        self.published: Published | None = None
        self._published_state: dict[str, Any] | None = None
        self._seen_current: int | None = None
        self.base_info: dict[str, Any] = {"version": UNTRAINED, "source": UNTRAINED, "path": None}
        self._base_stamp: tuple[str, int] | None = None
        self._base_failed: set[tuple[str, int]] = set()
        self.load_base_adapter(required=self.named_dir is not None)
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

    def _base_candidates(self) -> list[tuple[Path, str]]:
        if self.named_dir is not None:
            return [(self.named_dir, "base_adapter_dir")]
        found = [(self.received_dir, "coordinator")]
        return found + ([(self.builtin_dir, "builtin")] if self.builtin_dir is not None else [])

    def load_base_adapter(self, *, required: bool = False) -> bool:
        """(Re)load the base adapter that should answer (see the module's docstring) when it is not
        the one loaded or its manifest changed; True when another one was loaded."""
        for directory, source in self._base_candidates():
            try:
                stamp = (str(directory), (directory / ADAPTER_MANIFEST).stat().st_mtime_ns)
            except FileNotFoundError:
                if required:
                    raise FileNotFoundError(f"base_adapter_dir: {directory} holds no saved adapter "
                                            f"({ADAPTER_MANIFEST} missing)") from None
                continue
            if stamp == self._base_stamp:
                return False
            if stamp in self._base_failed:  # tried and refused already; look again when it changes
                continue
            problem = self._load_base(directory, source)
            if problem is None:
                self._base_stamp = stamp
                self._check_stale()
                return True
            if required:
                raise ValueError(problem)
            self._base_failed.add(stamp)
            if problem not in self.problems:
                log.error("%s", problem)
                self.problems.append(problem)
        return False

    def _load_base(self, directory: Path, source: str) -> str | None:
        """Load one candidate into the base slot; the problem when it cannot answer for this task."""
        try:
            manifest = adapters.read_manifest(directory)
            if manifest.role != "base":
                return f"base adapter {directory} not loaded: its manifest's role is {manifest.role!r}, not 'base'"
            if source != "base_adapter_dir" and manifest.task != self.task:
                # e.g. a data directory switched to another task keeps no other task's adapter
                return (f"base adapter {directory} not loaded: it was trained for {manifest.task!r}, this daemon "
                        f"serves {self.task!r}")
            with self.model_turn():
                manifest = self.engine.load_base(directory)
        except (OSError, ValueError) as e:
            return f"base adapter {directory} not loaded: {e}"
        self.base_info = {"version": adapter_version(manifest),
                          "source": source, "path": str(directory), "created": manifest.created,
                          "task": manifest.task, "data": dict(manifest.data)}
        log.info("base adapter %s (%s) loaded from %s", self.base_info["version"], source, directory)
        return None

    def _check_stale(self) -> None:
        """Whether the published personal adapter was trained on another base adapter than the
        one loaded (then it does not answer). Every adapter the daemon or a federated round trains
        records its base; one that does not (published by an older version of oppu) cannot be
        checked and is used as it is."""
        pub, was = self.published, self.stale
        trained_on = pub.manifest.train.get(TRAINED_ON) if pub is not None else None
        now = self.base_info["version"]
        if trained_on is None or trained_on == now:
            self.stale = None
        else:
            self.stale = (f"personal adapter {version_name(pub.version)} was trained on base adapter {trained_on}, "
                          f"but base adapter {now} ({self.base_info['source']}) answers now; answering without it "
                          "until one is trained on this base")
        if self.stale and self.stale != was:
            log.warning("%s", self.stale)
            self.problems.append(self.stale)

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
        self._check_stale()
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

    def refresh(self) -> bool:
        """Pick up what another process published into the data directory (not mid-training);
        True when another base adapter was loaded."""
        if self.training:
            return False
        changed = self.load_base_adapter()
        if self.personal.current_version() != self._seen_current:  # re-verify only on change
            self.load_published()
        return changed

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
        self._check_stale()

    # -- answering -----------------------------------------------------------------------------

    def answer(self, prompt: str, *, personal: bool, max_new_tokens: int,
               task: Any = None) -> tuple[str, Published | None, float]:
        """(text, the version that answered or None, seconds waited for the model); `task`: as
        Engine.answer's (a closed answer set lets decoding.label_choice pick a label)."""
        import time

        t0 = time.perf_counter()
        with self.model_turn():
            waited = time.perf_counter() - t0
            published = self.published if personal and not self.stale else None
            if published is not None and self.training:
                stash = _clone(self.engine.personal_state())
                self.engine.set_personal_state(self._published_state, label=str(published.path))
                try:
                    text = self.engine.answer([prompt], max_new_tokens=max_new_tokens, personal=True, task=task)[0]
                finally:
                    self.engine.set_personal_state(stash, label="training")
            else:
                text = self.engine.answer([prompt], max_new_tokens=max_new_tokens, personal=published is not None,
                                         task=task)[0]
        return text, published, waited

    # -- training ------------------------------------------------------------------------------

    def train(self, task: Any, examples: Sequence[Any], spec: Any, selection: Any, *,
              on_step: Callable[[int, int, float], None], cancelled: Callable[[], bool],
              manifest: Callable[[Any, Any], Any]) -> tuple[Any, Any, int | None]:
        """THE training loop with per-user validation (shared.selection.train_and_select) in the
        slot, yielding to answers between steps; publishes the adapter when it is adopted (not
        cancelled, beat the base on validation). Returns (TrainResult, Selection, version or
        None). `manifest(result, selection)` builds the AdapterManifest to save with it."""
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
            self.stale = None
        return versions
