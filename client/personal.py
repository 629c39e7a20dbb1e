"""The user's private adapter on disk: atomic versions, the last N kept, export, forget.

Layout under `root` (DIR/personal in a daemon's data directory):

    v000001/ v000002/ ...   one saved adapter each (PEFT files + oppu_adapter.json, see
                            shared.adapters); written by `write_adapter_dir`, so a version
                            directory is either complete or absent, never half written
    CURRENT                 the published version's name, e.g. "v000002" (atomic_write)
    .lock                   flock held while publishing (the daemon and a Flower ClientApp
                            process may both publish into the same directory)

Publishing is two atomic steps: write the version directory, then point CURRENT at it. A crash
between them leaves CURRENT on the previous version and an unpublished directory that
`recover()` removes at the next start. CURRENT is the single source of truth for "which adapter
answers"; a version whose files fail their sha256 check is skipped with a warning and the next
older verified one is used, so a damaged disk degrades to an older adapter, not to a crash.

Any process may publish through `PersonalAdapters.publish`; the daemon notices a new CURRENT
(it re-reads the 8-byte file before answering) and loads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shared.adapters import ADAPTER_MANIFEST, TRAINED_ON, AdapterManifest, read_manifest, verify_adapter_dir
from shared.fileio import atomic_write, fsync_dir, locked_dir

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
_VERSION = re.compile(r"^v(\d{6})$")


def version_name(n: int) -> str:
    return f"v{n:06d}"


def version_number(name: str) -> int | None:
    m = _VERSION.match(name)
    return int(m.group(1)) if m else None


@dataclass
class Published:
    """The adapter that answers: its version number, directory and manifest."""

    version: int
    path: Path
    manifest: AdapterManifest

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "version": self.version,
            "trained_at": m.created,
            "task": m.task,
            "peft_type": m.peft_type,
            "data": dict(m.data),
            "train": dict(m.train),
            "base_adapter": m.train.get(TRAINED_ON),
        }


class PersonalAdapters:
    """Versioned private adapters in one directory. Cheap to construct; no model needed."""

    def __init__(self, root: str | Path, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep!r} must be >= 1 (the published version is always kept)")
        self.root = Path(root)
        self.keep = keep

    # -- reading -------------------------------------------------------------------------------

    def versions(self) -> list[int]:
        """Complete version directories on disk, oldest first (published or not)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            n = version_number(p.name)
            if n is not None and p.is_dir() and (p / ADAPTER_MANIFEST).is_file():
                out.append(n)
        return sorted(out)

    def current_version(self) -> int | None:
        """What CURRENT names (None when nothing was published or CURRENT is unreadable)."""
        try:
            text = (self.root / CURRENT).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            log.warning("personal adapters: cannot read %s: %s", self.root / CURRENT, e)
            return None
        n = version_number(text)
        if n is None:
            log.warning("personal adapters: %s holds %r, not a version name; ignoring it", self.root / CURRENT, text[:40])
        return n

    def path(self, version: int) -> Path:
        return self.root / version_name(version)

    def resolve(self, *, base_model_hash: str | None = None) -> tuple[Published | None, list[str]]:
        """The newest usable published adapter: CURRENT if it verifies, else older verified ones.

        Returns (published or None, problems found on the way) so callers can report them.
        """
        problems: list[str] = []
        cur = self.current_version()
        if cur is None:
            return None, problems
        candidates = [cur] + [v for v in reversed(self.versions()) if v < cur]
        for v in candidates:
            try:
                manifest = verify_adapter_dir(self.path(v), base_model_hash=base_model_hash)
            except (OSError, ValueError) as e:
                problems.append(f"{version_name(v)}: {e}")
                continue
            if manifest.role != "personal":
                problems.append(f"{version_name(v)}: manifest role is {manifest.role!r}, not 'personal'")
                continue
            return Published(v, self.path(v), manifest), problems
        return None, problems

    # -- writing -------------------------------------------------------------------------------

    def locked(self) -> contextlib.AbstractContextManager[Path]:
        return locked_dir(self.root, mode=0o700)

    def publish(self, save: Callable[[Path], Any]) -> int:
        """Save a new version with `save(target_dir)` (atomic, e.g. engine.save_personal), make it
        current, drop versions beyond `keep`. Returns the new version number."""
        with self.locked():
            version = self._next_version()
            save(self.path(version))
            verify_adapter_dir(self.path(version))  # what we point CURRENT at must read back intact
            self._make_current(version)
        log.info("personal adapter %s published", version_name(version))
        return version

    def stage(self, save: Callable[[Path], Any]) -> int:
        """Save a new version like `publish` but leave CURRENT alone: nothing answers with it until
        `publish_staged` (or `discard` drops it; a crash before either leaves a version newer than
        CURRENT, which `recover` removes)."""
        with self.locked():
            version = self._next_version()
            save(self.path(version))
            verify_adapter_dir(self.path(version))
        return version

    def publish_staged(self, version: int) -> int:
        """Make a staged version current. If another process published meanwhile, the staged one
        is renumbered after it first, so the newest number is always the newest adapter."""
        with self.locked():
            verify_adapter_dir(self.path(version))
            newest = max(self.versions() + [self.current_version() or 0] + self._reserved())
            if newest > version:
                renumbered = newest + 1
                os.replace(self.path(version), self.path(renumbered))
                version = renumbered
            self._make_current(version)
        log.info("personal adapter %s published", version_name(version))
        return version

    def discard(self, version: int) -> None:
        """Delete a staged (never published) version."""
        with self.locked():
            if version != self.current_version():
                _remove(self.path(version))
                fsync_dir(self.root)

    def _next_version(self) -> int:
        known = self.versions() + [self.current_version() or 0] + self._reserved()
        return max(known, default=0) + 1

    def _make_current(self, version: int) -> None:
        atomic_write(self.root / CURRENT, version_name(version) + "\n")  # durable: file and directory
        self._prune(version)

    def set_current(self, version: int) -> None:
        """Point CURRENT at an existing version (e.g. to roll back)."""
        with self.locked():
            verify_adapter_dir(self.path(version))
            atomic_write(self.root / CURRENT, version_name(version) + "\n")

    def _reserved(self) -> list[int]:
        # A temp dir of another publisher still writing (the ClientApp process) claims its number.
        out = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                m = re.match(r"^\.(v\d{6})\.(?:tmp|old)-", p.name)
                if m:
                    out.append(version_number(m.group(1)) or 0)
        return out

    def _prune(self, current: int) -> list[str]:
        removed = []
        older = [v for v in self.versions() if v != current]
        keep_older = max(0, self.keep - 1)
        drop = older[: max(0, len(older) - keep_older)]
        for v in drop:
            shutil.rmtree(self.path(v), ignore_errors=True)
            removed.append(version_name(v))
        return removed

    def recover(self) -> list[str]:
        """After a crash: drop temp dirs and versions newer than CURRENT (never published)."""
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        with self.locked():
            cur = self.current_version() or 0
            for p in list(self.root.iterdir()):
                if p.name.startswith(".v") and (".tmp-" in p.name or ".old-" in p.name):
                    _remove(p)
                    removed.append(p.name)
                    continue
                n = version_number(p.name)
                if n is not None and n > cur and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
        if removed:
            log.warning("personal adapters: removed unfinished or unpublished %s", ", ".join(removed))
        return removed

    def forget(self) -> list[str]:
        """Delete every version and CURRENT; returns the version names deleted."""
        if not self.root.exists():
            return []
        with self.locked():
            names = [version_name(v) for v in self.versions()]
            (self.root / CURRENT).unlink(missing_ok=True)
            for p in list(self.root.iterdir()):
                if p.name == ".lock":
                    continue
                _remove(p)
        return names

    def manifest_for(self, version: int) -> AdapterManifest:
        return read_manifest(self.path(version))


def new_manifest(*, base_model_hash: str, task: str, peft_type: str, data: dict[str, int],
                 train: dict[str, Any], privacy: dict[str, float] | None = None) -> AdapterManifest:
    return AdapterManifest(role="personal", base_model_hash=base_model_hash, task=task, peft_type=peft_type,
                           data=dict(data), train=dict(train), privacy=dict(privacy or {}), created=time.time())


def _remove(p: Path) -> None:
    """Delete a file or a directory tree (a symlink itself, never what it points to)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
