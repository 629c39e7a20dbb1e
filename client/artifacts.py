"""The client's content-addressed artifact cache: what the coordinator streams lands here.

Layout under `root`:

    <id>/                 a complete, verified artifact (the directory name is its id)
    .partial-<id>/        chunks being received: .oppu-partial.json + files growing in order
    .lock                 flock held while receiving (several processes may share one cache:
                          virtual users of a simulation, one ClientApp process per message)

A chunk is appended only up to the offset the partial file has reached (bytes already held are
skipped, so the same chunk may arrive twice), and a chunk that would leave a gap is refused. When
a file is complete its sha256 is checked; a mismatch refuses the artifact with `ArtifactRejected`
(the complete artifacts already cached are untouched). When every file is verified the partial
directory is renamed to `<id>/` in one step, so a reader sees a whole artifact or none.

The client, not the coordinator, decides where the cache is and how much it may hold (the daemon's
`artifact_cache` and `artifact_quota_mb`, passed to its SuperNode as node config). The quota counts
every complete and partial artifact; an artifact is refused before its first byte is written when
its manifest's size would not fit, and no write goes past the manifest's sizes, so the cache never
exceeds it. Any refusal or write error deletes that artifact's partial directory; the daemon
deletes all partial directories when it starts (`discard_partial`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from shared.fileio import fsync_dir, locked_dir
from shared.model_manifest import MANIFEST, sha256_file
from shared.protocol import KIND_MODEL, ArtifactManifest, ChunkHeader, ClientError

log = logging.getLogger(__name__)

_ID = re.compile(r"^[0-9a-f]{64}$")
PARTIAL_META = ".oppu-partial.json"  # never an artifact file name: those may not start with "."


class ArtifactRejected(ClientError):
    """A received artifact failed verification; the cache keeps what it had."""


class ArtifactCache:
    def __init__(self, root: str | Path, *, quota_bytes: int | None = None) -> None:
        self.root = Path(root).expanduser()
        self.quota_bytes = quota_bytes  # None: no limit (a simulation's shared cache)

    # -- reading -------------------------------------------------------------------------------

    def held(self) -> list[str]:
        """Ids of complete artifacts (only names a completed rename can produce)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _ID.match(p.name))

    def has(self, artifact_id: str) -> bool:
        return bool(_ID.match(artifact_id)) and (self.root / artifact_id).is_dir()

    def path(self, artifact_id: str) -> Path:
        if not self.has(artifact_id):
            raise ClientError(
                f"artifact {artifact_id[:12]} is not in the client cache; "
                "the coordinator sends it before the first round this client takes part in"
            )
        return self.root / artifact_id

    # -- receiving -----------------------------------------------------------------------------

    def _locked(self) -> contextlib.AbstractContextManager[Path]:
        return locked_dir(self.root)

    def receive(self, header: ChunkHeader, data: bytes) -> dict[str, int | str]:
        """Store one message's segments. Returns {"status": "partial" | "complete" | "held", "held": bytes}.

        Idempotent: bytes already written (another process sharing this cache received the same
        chunk) are skipped, so several nodes may be sent the same artifact at once."""
        manifest = ArtifactManifest.from_json(header.manifest)  # checks id == hash(file list), safe paths
        if len(data) != header.total:
            raise ArtifactRejected(f"artifact {manifest.id[:12]}: message carries {len(data)} bytes, "
                                   f"its header says {header.total}")
        with self._locked():
            if self.has(manifest.id):
                return {"status": "held", "held": manifest.total_bytes}
            partial = self.root / f".partial-{manifest.id}"
            try:
                self._check_quota(manifest, partial)
                partial.mkdir(parents=True, exist_ok=True)
                (partial / PARTIAL_META).write_text(manifest.to_json())
                pos = 0
                for rel, offset, length in zip(header.files, header.offsets, header.lengths):
                    self._write_segment(partial, manifest, rel, offset, data[pos:pos + length])
                    pos += length
                held = sum(min(_size(partial / rel), manifest.sizes[rel]) for rel in manifest.files)
                if not self._all_verified(partial, manifest):
                    return {"status": "partial", "held": held}
                self._commit(partial, manifest)
            except BaseException:  # refused, disk full, interrupted: no half artifact stays behind
                shutil.rmtree(partial, ignore_errors=True)
                raise
            return {"status": "complete", "held": held}

    def used_bytes(self, *, besides: Path | None = None) -> int:
        """Bytes of every complete and partial artifact in the cache (`besides` not counted)."""
        if not self.root.is_dir():
            return 0
        total = 0
        for p in self.root.iterdir():
            if p == besides or not p.is_dir() or p.is_symlink():
                continue
            if _ID.match(p.name) or p.name.startswith(".partial-"):
                total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        return total

    def _check_quota(self, manifest: ArtifactManifest, partial: Path) -> None:
        if self.quota_bytes is None:
            return
        used = self.used_bytes(besides=partial)
        if used + manifest.total_bytes > self.quota_bytes:
            log.error("artifact %s (%d bytes) refused: the artifact cache %s holds %d bytes, its quota is %d "
                      "(daemon.artifact_quota_mb)", manifest.id[:12], manifest.total_bytes, self.root, used,
                      self.quota_bytes)
            raise ArtifactRejected(
                f"artifact {manifest.id[:12]} ({manifest.kind}, {_mib(manifest.total_bytes)}) does not fit this "
                f"client's artifact quota: {_mib(used)} of {_mib(self.quota_bytes)} already in use; the user can "
                "raise daemon.artifact_quota_mb or remove unused artifacts from the cache; nothing was written")

    def _write_segment(self, partial: Path, manifest: ArtifactManifest, rel: str, offset: int, data: bytes) -> None:
        if rel not in manifest.files:
            raise ArtifactRejected(f"artifact {manifest.id[:12]}: {rel!r} is not one of its files")
        size = manifest.sizes[rel]
        if offset < 0 or offset + len(data) > size:
            raise ArtifactRejected(f"artifact {manifest.id[:12]}: bytes {offset}-{offset + len(data)} lie outside "
                                   f"{rel} ({size} bytes)")
        target = partial / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.touch()
        have = _size(target)
        if offset > have:
            raise ArtifactRejected(f"artifact {manifest.id[:12]}: chunk of {rel} starts at {offset}, but only "
                                   f"{have} bytes are held; the partial download was discarded, the transfer must "
                                   "restart from the beginning")
        if offset + len(data) > have:  # skip what is already there
            with open(target, "ab") as fh:
                fh.write(data[have - offset:])
                fh.flush()
                os.fsync(fh.fileno())
        if _size(target) == size and not _marker(partial, rel).exists():
            digest = sha256_file(target)
            if digest != manifest.files[rel]:
                raise ArtifactRejected(
                    f"artifact {manifest.id[:12]} ({manifest.kind}): {rel} has sha256 {digest[:12]}, the manifest "
                    "says " + manifest.files[rel][:12] + "; refused, the cache keeps its previous contents")
            _marker(partial, rel).touch()

    def _all_verified(self, partial: Path, manifest: ArtifactManifest) -> bool:
        return all(_marker(partial, rel).exists() for rel in manifest.files)

    def _commit(self, partial: Path, manifest: ArtifactManifest) -> None:
        for marker in [partial / PARTIAL_META, *partial.glob(".ok-*")]:
            marker.unlink()
        if manifest.kind == KIND_MODEL:
            # shared.model reads the model hash from here instead of re-hashing hundreds of MB.
            (partial / MANIFEST).write_text(json.dumps(
                {"source": "coordinator", "artifact": manifest.id, "files": manifest.files,
                 "model_hash": manifest.identity or manifest.id}, indent=2))
        final = self.root / manifest.id
        os.replace(partial, final)
        fsync_dir(self.root)
        log.info("artifact %s (%s, %d bytes) verified and cached", manifest.id[:12], manifest.kind,
                 manifest.total_bytes)

    def discard_partial(self) -> list[str]:
        """Delete every partial download (the daemon at start: whatever wrote them is gone)."""
        if not self.root.is_dir():
            return []
        with self._locked():
            removed = sorted(p.name for p in self.root.glob(".partial-*"))
            for name in removed:
                shutil.rmtree(self.root / name, ignore_errors=True)
        if removed:
            log.warning("artifact cache %s: removed %d unfinished download(s)", self.root, len(removed))
        return removed


def _marker(partial: Path, rel: str) -> Path:
    """"`rel` is complete and its sha256 matched." Named by a hash of the path: a name built by
    replacing "/" would let "a/b" and "a__b" share one marker, and so let one file's check stand
    for another's (artifact names never start with ".", so no marker is an artifact file)."""
    return partial / f".ok-{hashlib.sha256(rel.encode()).hexdigest()[:32]}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
