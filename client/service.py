"""What the daemon does, independent of HTTP: one user's history, private adapter and model.

`ClientService` owns the user's Chroma history store (the only process that opens it: the
ClientApp reads the snapshot kept here, client/snapshot.py), their versioned personal adapters
(client.personal), the model host (client.host: the Engine shared by answering and training,
answering first; which base adapter answers), the built-in base adapter when no other is given
(client.basechoice), the job runner (client.jobs) and, with a coordinator, the SuperNode supervisor
(client.supernode). The API (client/api.py) is a thin layer over its methods; tests drive it
directly too. Beside it: the task a data directory serves (client/directory_task.py), a training
job (client/training_job.py), status (client/daemon_status.py), merging an imported archive
(client/archive_import.py) and the refusals the API maps to HTTP statuses (client/service_errors.py).

Locks, always taken in this order: `_maintenance` (import / forget / starting a job) ->
`store_lock` (the Chroma store, its caches and its snapshot; never held while waiting for the model) ->
the model (ModelHost.model_turn / engine.lock) -> the personal directory's flock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from shared.personalize import Context, ensure_profile, prompt_for, retrieve_for
from shared.records import HistoryItem
from shared.retrieval import make_retriever
from shared.selection import history_needed
from shared.tasks import get_task

from .appgate import app_trust
from .archive import read_archive, write_archive
from .archive_import import merge_archive
from .artifacts import ArtifactCache
from .basechoice import BuiltinBase, Preparing
from .daemon_status import daemon_status
from .directory_task import RECEIVED_BASE, claim_for_task
from .host import UNTRAINED, ModelHost
from .jobs import JobBusy, JobRegistry
from .personal import PersonalAdapters
from .service_errors import Busy, Conflict, NotFound
from .settings import AUGMENTATION_METHOD, DaemonSpec
from .snapshot import snapshot_path, write_snapshot
from .supernode import supernode_supervisor
from .training_job import run_training
from .userdir import forget_derived

log = logging.getLogger(__name__)

NOT_PERSONAL = {"plain": "non-personalized", "rag": "RAG", "pag": "PAG"}


class ClientService:
    def __init__(self, spec: DaemonSpec, data_dir: str | Path, *, engine: Any = None,
                 lock_fd: int | None = None) -> None:
        from client.store import ChromaHistoryStore  # chromadb is imported only here

        self.spec = spec
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.task = get_task(spec.task)
        self.started = time.time()
        # The daemon is the store's one owner (a second opener gets StoreInUse); the ClientApp
        # reads the snapshot written here, before the SuperNode starts and after every change.
        self.store = ChromaHistoryStore(self.dir / "history", self.task.item_text)
        self.store_lock = threading.RLock()
        try:
            claim_for_task(self.dir, spec, self.store.count)
            self._set_up(engine, lock_fd)
        except BaseException:
            with contextlib.suppress(Exception):  # a failed start leaves the store free for the next
                self.store.close()
            raise

    def _set_up(self, engine: Any, lock_fd: int | None) -> None:
        from shared.engine import Engine  # torch loads when a daemon starts, not when the API module is imported

        spec = self.spec
        self.supervisor = self.trust = None
        if spec.coordinator:  # before the model loads: a daemon that may not join fails at once
            self.trust = app_trust(spec.coordinator, self.dir, trusted_app_hashes=spec.trusted_app_hashes,
                                   trusted_entities=spec.trusted_entities)
            self.supervisor = supernode_supervisor(
                spec.coordinator, self.dir, executable=spec.supernode_command,
                initial=spec.backoff_initial, maximum=spec.backoff_max,
                root_certificates=spec.coordinator_root_certificates, insecure=spec.insecure,
                auth_private_key=spec.supernode_auth_key, trust=self.trust,
                lock_fd=lock_fd,  # the node holds the daemon's data-directory lock too
                cache_dir=spec.artifact_root(self.dir), artifact_quota_mb=spec.artifact_quota_mb)
        engine = engine if engine is not None else Engine(
            spec.base_model, spec.base_adapter, spec.personal_adapter, seed=spec.personal_train.seed)
        with self.store_lock:
            self.sync_snapshot()
        self.retriever = make_retriever(spec.retrieval.retriever, self.task.item_text)
        self.personal = PersonalAdapters(self.dir / "personal", keep=spec.keep_versions)
        self.personal.recover()
        # Downloads in flight died with the previous daemon's SuperNode (reaped before this runs).
        ArtifactCache(spec.artifact_root(self.dir)).discard_partial()
        self.jobs = JobRegistry(self.dir / "jobs", nice=spec.train_nice)
        engine.decoding = spec.decoding  # answers decoded as the experiments decode them
        self.engine = engine
        self._maintenance = threading.Lock()
        self._auto_attempt_count = 0
        self._closing = False
        self.retrain_note: str | None = None  # why a stale personal adapter is not being retrained
        named = Path(spec.base_adapter_dir).expanduser() if spec.base_adapter_dir else None
        self.host = ModelHost(engine, self.personal, task=self.task.name, named_dir=named,
                              received_dir=self.dir / RECEIVED_BASE)
        self.base = BuiltinBase(spec, self.dir, engine, self.host, self.jobs)
        if self.host.base_info["source"] == UNTRAINED:
            self.base.choose()

    # -- lifetime ------------------------------------------------------------------------------

    def start(self) -> None:
        """Background work: the SuperNode, the built-in base adapter's training when it is missing
        (builtin_base.when_missing = "train"), a personal adapter's retraining on a new base."""
        if self.supervisor is not None:
            self.supervisor.start()
        if not self.base.start(then=self._after_base_job):
            self._retrain_for_base("start")

    def _after_base_job(self) -> None:
        if not self._closing:
            self._retrain_for_base("the base adapter changed")

    # -- the base adapter ----------------------------------------------------------------------

    def _retrain_for_base(self, trigger: str) -> Any:
        """A published personal adapter trained on another base adapter does not answer
        (ModelHost.stale): retrain it on this one when the history is large enough."""
        self.retrain_note = None
        if not self.host.stale:
            return None
        count, need = self.count(), history_needed(self.spec.selection)
        if count < need:
            self.retrain_note = (f"not retrained: training needs at least {need} history items "
                                 f"(selection.min_train + the held-out ones), {count} stored; add more")
            log.warning("%s", self.retrain_note)
            return None
        try:
            job = self.train(trigger=trigger)
        except (JobBusy, Busy) as e:
            self.retrain_note = f"retraining waits: {e}; `oppu client train` starts it"
            return None
        log.info("retraining the personal adapter on base adapter %s: job %s", self.host.base_info["version"], job.id)
        return job

    def close(self, *, timeout: float = 30.0) -> None:
        """Graceful stop: cancel training (the published adapter stays), stop the SuperNode."""
        self._closing = True
        job = self.jobs.cancel_active(wait=timeout)
        if job is not None:
            log.info("shutdown: job %s stopped (%s)", job.id, job.state)
        if self.supervisor is not None:
            self.supervisor.stop()
        with self.store_lock:
            with contextlib.suppress(Exception):
                self.store.close()

    # -- history -------------------------------------------------------------------------------

    def sync_snapshot(self) -> None:
        """Rewrite the ClientApp's read-only copy of the history (client/snapshot.py) from the
        store. Called with store_lock held after every change, before it is acknowledged; also
        after an add that added nothing, so a client's retry repairs a snapshot whose write failed."""
        write_snapshot(snapshot_path(self.store.path), self.store.items(), task=self.task.name,
                       profile=self.store.get_profile())

    def add(self, items: list[HistoryItem]) -> dict[str, Any]:
        with self.store_lock:
            try:
                added = self.store.add(items)  # checks the whole batch before writing anything
            except ValueError as e:
                raise Conflict(str(e)) from None
            self.sync_snapshot()
            count = self.store.count()
        job = self._maybe_auto_train(count)
        return {"added": added, "skipped": len(items) - added, "history_count": count,
                "auto_train_job": job.id if job else None}

    def delete(self, item_id: str) -> dict[str, Any]:
        """Remove one item from the store and from the ClientApp's snapshot (before answering),
        so no later training, round or retrieval sees it. A PAG profile, written from the whole
        history, goes with it (made again, without the item, when next needed). An adapter
        already trained keeps what it learned until the next training: the answer names the
        personal-adapter version in use, trained before the deletion.
        NotFound when no item has this id."""
        with self.store_lock:
            if not self.store.get([item_id]):
                # As after an add that added nothing: a retry after a failed snapshot write (the
                # item left the store, the error answered) repairs the ClientApp's copy.
                self.sync_snapshot()
                raise NotFound(f"no history item {item_id[:80]!r}; `oppu client search` or GET /v1/history "
                               "lists the ids")
            self.store.remove([item_id])
            had_profile = self.store.get_profile() is not None
            if had_profile:
                self.store.delete_profile()
            self.sync_snapshot()
            count = self.store.count()
        pub = self.host.published
        log.info("history item deleted (%d left%s)", count, "; profile removed" if had_profile else "")
        return {"deleted": item_id, "history_count": count, "profile_removed": had_profile,
                "personal_version": pub.version if pub else None}

    def count(self) -> int:
        with self.store_lock:
            return self.store.count()

    def list_items(self, offset: int, limit: int) -> tuple[int, list[HistoryItem]]:
        with self.store_lock:
            items = self.store.items()
        return len(items), items[offset:offset + limit]

    def search(self, query: str, k: int) -> list[HistoryItem]:
        with self.store_lock:
            return self.retriever.retrieve(self.store, query, k)

    def history_context(self) -> Context:
        ctx = Context(self.store, self.retriever, self.spec.retrieval)
        if self.spec.augmentation == "pag":
            with self.store_lock:
                ctx.profile = self.store.get_profile()
                history = self.store.items() if not ctx.profile else []
            if history:  # generated once with the bare model, then cached in the store
                with self.host.model_turn():
                    ensure_profile(self.engine, self.task, ctx, history, seed=self.spec.personal_train.seed,
                                   keep=self._keep_profile)
        return ctx

    def _keep_profile(self, text: str) -> None:
        with self.store_lock:
            self.store.set_profile(text)
            self.sync_snapshot()

    # -- asking --------------------------------------------------------------------------------

    def ask(self, query_input: str, *, personal: bool = True, max_new_tokens: int | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        job = self.base.preparing()
        if job is not None:
            raise Preparing(f"the {self.task.name} base adapter is being prepared (job {job.id}: "
                            f"{job.phase or job.state}, step {job.steps_done}/{job.steps_total or '?'}); ask again "
                            "when it is done (`oppu client ask` waits for it)", job)
        self.refresh()
        aug = self.spec.augmentation
        ctx = self.history_context()
        with self.store_lock:
            prompt = prompt_for(self.task, ctx, query_input, aug)
            retrieved = [it.id for it in retrieve_for(self.task, ctx, query_input, None)] if aug != "plain" else []
            if max_new_tokens is None:
                history = self.store.items() if self.spec.decoding.length_from_history > 0 else []
                max_new_tokens = self.engine.answer_tokens(self.task, history)
        text, published, waited = self.host.answer(prompt, personal=personal, max_new_tokens=max_new_tokens,
                                                    task=self.task)
        base = self.host.base_info
        prediction = self.task.parse_answer(text)
        warnings = []
        if base["source"] == UNTRAINED:
            warnings.append(f"the base adapter is untrained, so answers do not know the task yet: {self.base.untrained_why}")
        if personal and self.host.stale:
            warnings.append(self.host.stale + (f"; {self.retrain_note}" if self.retrain_note else ""))
        if prediction is None:
            warnings.append("no prediction: the answer is " + ("empty" if self.task.kind == "generation" else
                                                               f"not {self.task.answer_kind()}"))
        return {
            "answer": text, "prediction": prediction,
            "method": AUGMENTATION_METHOD[aug] if published is not None else NOT_PERSONAL[aug],
            "personal_version": published.version if published else None,
            "base_adapter_version": base["version"], "base_adapter_source": base["source"],
            "warnings": warnings,
            "retrieved": retrieved, "seconds": round(time.perf_counter() - t0, 4),
            "waited_for_model_s": round(waited, 4),
        }

    def refresh(self) -> None:
        """Pick up a base or personal adapter another process published (the ClientApp); a new
        base adapter makes the personal one stale, which is then retrained."""
        if self.host.refresh():
            self._retrain_for_base("the base adapter changed")

    # -- training ------------------------------------------------------------------------------

    def train(self, *, trigger: str = "api", overrides: dict[str, Any] | None = None):
        """Start a background training job; raises JobBusy/Busy when one cannot start now."""
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        spec = dataclasses.replace(self.spec.personal_train, **overrides)  # validated by TrainSpec
        if not self._maintenance.acquire(blocking=False):
            raise Busy("an import or forget is under way; try again when it has finished")
        try:
            return self.jobs.submit("train", lambda ctl: run_training(self, ctl, spec), trigger=trigger,
                                    params={"epochs": spec.epochs, "lr": spec.lr, "augmentation": self.spec.augmentation})
        finally:
            self._maintenance.release()

    def trained_on(self) -> int:
        """How many history items the personal adapter in use was trained on (0: none in use)."""
        pub = self.host.published
        return int(pub.manifest.data.get("history_items", 0)) if pub else 0

    def auto_train_at(self) -> int:
        """The history size the next automatic training waits for: `retrain_after` new items since
        the adapter in use (or the last automatic attempt), and never below what per-user
        selection needs to train and validate (shared.selection.history_needed). 0: off."""
        n = self.spec.retrain_after
        if not n:
            return 0
        return max(max(self.trained_on(), self._auto_attempt_count) + n, history_needed(self.spec.selection))

    def auto_train_status(self, count: int) -> dict[str, Any]:
        """When automatic training starts next, in numbers and in words, for `count` stored items."""
        at = self.auto_train_at()
        if not at:
            message = "automatic training is off (retrain_after = 0); start one with `oppu client train`"
        elif self.host.published is None and not self._auto_attempt_count:
            message = f"auto-training starts at {at} items; you have {count}"
        else:
            message = f"next automatic training at {at} items ({self.spec.retrain_after} new); you have {count}"
        return {"at": at or None, "history_needed": history_needed(self.spec.selection), "message": message}

    def _maybe_auto_train(self, count: int):
        at = self.auto_train_at()
        if not at or count < at or self.jobs.active():
            return None
        try:
            job = self.train(trigger="auto")
        except (JobBusy, Busy):
            return None
        self._auto_attempt_count = count
        log.info("automatic training: %d history items (%d new since the adapter in use; starts at %d): job %s",
                 count, count - self.trained_on(), at, job.id)
        return job

    # -- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `oppu client status` shows (client/daemon_status.py)."""
        return daemon_status(self)

    # -- export / import / forget --------------------------------------------------------------

    def export(self, dest: Path) -> dict[str, Any]:
        with self.store_lock:
            items = self.store.items()
            profile = self.store.get_profile()
        with self.personal.locked():  # a publish cannot prune the version being copied
            pub = self.host.published
            return write_archive(dest, task=self.task.name, base_model_hash=self.engine.model_hash, items=items,
                                 profile=profile, adapter_dir=pub.path if pub else None,
                                 personal_version=pub.version if pub else None)

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        if not self._maintenance.acquire(timeout=5):
            raise Busy(f"another import or forget is under way; {what} later")
        try:
            yield
        finally:
            self._maintenance.release()

    def import_archive(self, path: Path) -> dict[str, Any]:
        """Merge an export archive: everything is checked before anything is changed."""
        with self._exclusive("import"):
            active = self.jobs.active()
            if active is not None:
                raise JobBusy(active)
            archive = read_archive(path, self.dir / "tmp", max_bytes=int(self.spec.max_import_mb * 2**20),
                                   task=self.task.name)
            try:
                result = merge_archive(self, archive)
            finally:
                archive.cleanup()
        if self.host.stale:  # the archive's adapter was trained on another base adapter
            job = self._retrain_for_base("imported adapter on another base")
            result["retrain_job"] = job.id if job is not None else None
            result["retraining"] = self.retrain_note
        return result

    def forget(self) -> dict[str, Any]:
        """Delete the history store and everything derived from the history (client.userdir's
        HISTORY_DERIVED: every adapter of every augmentation, profiles, selection records, job
        records, imports in flight, logs).

        What stays under DIR/history: owner.lock (this daemon's pid and command line, nothing of the
        history) and the snapshot, rewritten with no items and no profile."""
        with self._exclusive("forget"):
            preparing = self.base.preparing()
            if preparing is not None:  # not derived from the history: cancelling it would only cost a restart
                raise Busy(f"the base adapter is being prepared (job {preparing.id}, not derived from your history); "
                           "forget when it is done")
            job = self.jobs.cancel_active(wait=120)
            if job is not None and self.jobs.active() is not None:
                raise Busy(f"job {job.id} did not stop; try again")
            # A federated round under way has read the history: stopped first, its ClientApp
            # cannot publish an adapter or profile derived from it after the deletion.
            supernode_was_running = self.supervisor is not None and self.supervisor.status()["state"] != "stopped"
            if supernode_was_running:
                self.supervisor.stop()
            try:
                with self.store_lock:
                    n_items = self.store.count()
                    had_profile = self.store.get_profile() is not None
                    self.store.wipe()  # the store's files, not just its rows; the daemon stays its owner
                versions = self.host.forget()
                jobs = self.jobs.forget()
                self.jobs.interrupted = []
                with self.store_lock:  # HISTORY_DERIVED includes the snapshot: rewritten after, empty
                    files = forget_derived(self.dir)
                    self.sync_snapshot()  # a round after forget trains on nothing, not on a missing file
                self._auto_attempt_count = 0
            finally:
                if supernode_was_running:
                    self.supervisor.start()
        log.warning("forget: deleted %d history items, %d adapter versions, %d job records, %d derived files",
                    n_items, len(versions), jobs, len(files))
        return {"deleted": {"history_items": n_items, "profile": had_profile, "adapter_versions": versions,
                            "job_records": jobs, "derived_files": files},
                "kept": {"base_adapter": "shared by every user, not yours",
                         "federation.json": "privacy already spent in federated rounds stays accounted",
                         "federation/record-privacy-*.json": "privacy spent on your records stays accounted",
                         "logs": "emptied; they keep only what happens from now on"}}

