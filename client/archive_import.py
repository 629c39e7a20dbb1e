"""Importing an export archive into a running daemon: all or nothing, checked before anything
changes (client/archive.py reads and verifies the archive; this merges it)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import adapters
from shared.adapters import AdapterManifest
from shared.records import HistoryItem
from shared.retrieval import new_items

from .archive import Archive, ArchiveError
from .items import parse_items
from .service_errors import Conflict

if TYPE_CHECKING:  # for the annotations only: the service imports this module
    from .service import ClientService

log = logging.getLogger(__name__)


def merge_archive(svc: ClientService, archive: Archive) -> dict[str, Any]:
    """All or nothing: the adapter is staged (saved, not answering), then the history and
    profile are written, then the adapter is published. A failure at any step undoes the
    earlier ones, so status, answers and the store are as before. (A crash between the
    history write and the publish leaves the history imported and the adapter unpublished;
    importing the same archive again completes it, items being idempotent by id.)"""
    items = parse_items(archive.history, svc.task, max_field_chars=svc.spec.max_field_chars)
    with svc.store_lock:
        try:
            new_items(items, lambda i: next(iter(svc.store.get([i])), None))
        except ValueError as e:
            raise Conflict(str(e)) from None
    staged = _stage_adapter(svc, archive.adapter_dir) if archive.adapter_dir is not None else None
    version = None
    try:
        added, undo_history = _write_history(svc, items, archive.profile)
        try:
            if staged is not None:
                version = svc.host.publish_staged(staged)
        except BaseException:
            undo_history()
            raise
    except BaseException:
        if staged is not None:
            svc.host.discard_staged(staged)
        raise
    out = {"history_added": added, "history_skipped": len(items) - added, "profile": bool(archive.profile),
           "personal_version": version, "archive_personal_version": archive.manifest.personal_version,
           "personal_answers": version is not None and not svc.host.stale,
           "personal_not_answering_because": svc.host.stale if version is not None else None}
    return out

def _stage_adapter(svc: ClientService, adapter_dir: Path) -> int:
    try:
        m = adapters.verify_adapter_dir(adapter_dir, base_model_hash=svc.engine.model_hash)
    except (OSError, ValueError) as e:
        raise ArchiveError(f"the archive's adapter: {e}") from None
    want = svc.spec.personal_adapter.peft_type
    if m.role != "personal" or m.task != svc.task.name or m.peft_type != want:
        raise ArchiveError(f"the archive's adapter is a {m.role} {m.peft_type} adapter for {m.task!r}; this "
                           f"daemon needs a personal {want} adapter for {svc.task.name!r}")
    kept = AdapterManifest(**{**m.__dict__, "files": {}})
    kept.train = {**kept.train, "imported": time.time()}
    try:
        return svc.host.stage_adapter(adapter_dir, kept)
    except (ValueError, RuntimeError) as e:
        raise ArchiveError(f"the archive's adapter cannot be loaded: {e}") from None

def _write_history(svc: ClientService, items: list[HistoryItem], profile: str | None) -> tuple[int, Any]:
    """Add the items and set the profile; returns (items added, a function undoing both).
    Raises with both undone when either write fails."""
    with svc.store_lock:
        present = {it.id for it in svc.store.get([it.id for it in items])}
        fresh = [it.id for it in items if it.id not in present]
        previous_profile = svc.store.get_profile()

    def undo() -> None:
        with svc.store_lock:
            svc.store.remove(fresh)
            if profile and previous_profile is not None:
                svc.store.set_profile(previous_profile)
            elif profile:
                svc.store.delete_profile()
            svc.sync_snapshot()  # the ClientApp's copy must not keep the undone items

    try:
        with svc.store_lock:
            added = svc.store.add(items)
            if profile:
                svc.store.set_profile(profile)
            svc.sync_snapshot()
    except BaseException:
        try:
            undo()
        except Exception as e:  # noqa: BLE001 - report the first failure, log the second
            log.error("import: undoing a failed history write also failed: %s", e)
        raise
    return added, undo
