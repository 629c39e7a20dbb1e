"""One archive holding a user's history, profile and published personal adapter: export and import.

Format: a gzip'ed tar with exactly these regular-file members (anything else is refused):

    oppu-export.json                      manifest: {"format": "oppu-export", "format_version": 1,
                                          "task", "base_model_hash", "created", "history_items",
                                          "personal_version", "framework_version",
                                          "files": {member: sha256}}
    history.jsonl                         one {"id", "fields", "time"} object per line, oldest first
    profile.json                          optional: {"profile": "..."}
    personal/adapter_config.json          optional, all together: the adapter in PEFT's format
    personal/adapter_model.safetensors    (weights in safetensors only)
    personal/oppu_adapter.json            plus its own manifest (see shared.adapters)
    personal/README.md                    optional (PEFT writes a model card)

Reading never calls `tarfile.extract`: each allowed member is copied by us, byte-counted against
its declared size and a limit, into a private directory, and its sha256 must match the manifest.
Path traversal, absolute names, links, devices, duplicates, oversized members and a wrong or
missing manifest are refused with an `ArchiveError` naming the member. Nothing is unpickled:
weights are later read with safetensors by `shared.adapters.load_adapter`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from shared.adapters import FRAMEWORK_VERSION
from shared.records import HistoryItem

FORMAT = "oppu-export"
FORMAT_VERSION = 1
MANIFEST = "oppu-export.json"
HISTORY = "history.jsonl"
PROFILE = "profile.json"
ADAPTER_PREFIX = "personal/"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "oppu_adapter.json")
ADAPTER_OPTIONAL = ("README.md",)
SMALL_LIMIT = 4 << 20  # json/markdown members
MAX_MEMBERS = 16
MAX_PROFILE_CHARS = 100_000

_ALLOWED = {MANIFEST, HISTORY, PROFILE} | {ADAPTER_PREFIX + f for f in ADAPTER_FILES + ADAPTER_OPTIONAL}


class ArchiveError(ValueError):
    """An archive that cannot be imported; nothing was stored."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------- export


def write_archive(
    dest: str | Path,
    *,
    task: str,
    base_model_hash: str,
    items: Sequence[HistoryItem],
    profile: str | None,
    adapter_dir: Path | None,
    personal_version: int | None,
) -> dict[str, Any]:
    """Write the archive to `dest` atomically (temporary file, fsync, rename); returns its manifest."""
    dest = Path(dest)
    blobs: dict[str, bytes] = {}
    lines = [json.dumps({"id": it.id, "fields": dict(it.fields), "time": it.time}, ensure_ascii=False) for it in items]
    blobs[HISTORY] = ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8")
    if profile:
        blobs[PROFILE] = json.dumps({"profile": profile}, ensure_ascii=False).encode("utf-8")
    if adapter_dir is not None:
        for name in ADAPTER_FILES + ADAPTER_OPTIONAL:
            f = Path(adapter_dir) / name
            if f.is_file():
                blobs[ADAPTER_PREFIX + name] = f.read_bytes()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "task": task, "base_model_hash": base_model_hash,
        "created": time.time(), "history_items": len(items),
        "personal_version": personal_version if adapter_dir is not None else None,
        "framework_version": FRAMEWORK_VERSION,
        "files": {name: sha256_bytes(data) for name, data in sorted(blobs.items())},
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
                _add(tar, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
                for name, data in sorted(blobs.items()):
                    _add(tar, name, data)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o600)  # the user's private history
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------- import


@dataclass
class Archive:
    """A verified archive unpacked into `directory` (deleted by `cleanup`)."""

    directory: Path
    manifest: dict[str, Any]
    history: list[Any]  # raw JSON objects; validated by client.items.parse_items
    profile: str | None
    adapter_dir: Path | None

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)


def _member_limit(name: str, max_bytes: int) -> int:
    return max_bytes if name in (HISTORY, ADAPTER_PREFIX + "adapter_model.safetensors") else min(SMALL_LIMIT, max_bytes)


def _check_name(member: tarfile.TarInfo) -> str:
    name = member.name
    if "\\" in name or "\x00" in name:
        raise ArchiveError(f"archive member {name!r} has a backslash or NUL in its name")
    if name.startswith("/") or posixpath.isabs(name):
        raise ArchiveError(f"archive member {name!r} has an absolute path")
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../") or "/../" in f"/{name}/":
        raise ArchiveError(f"archive member {name!r} points outside the archive (path traversal)")
    return norm


def read_archive(path: str | Path, work_dir: str | Path, *, max_bytes: int, task: str) -> Archive:
    """Unpack and verify an export archive into a new private directory under `work_dir`."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory = Path(tempfile.mkdtemp(prefix="import-", dir=work_dir))
    try:
        files = _unpack(Path(path), directory, max_bytes)
        archive = _verify(directory, files, task)
    except BaseException:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
        raise
    return archive


def _unpack(path: Path, directory: Path, max_bytes: int) -> dict[str, Path]:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ArchiveError(f"cannot read the archive: {e}") from None
    if size > max_bytes:
        raise ArchiveError(f"the archive is {size} bytes; the limit is {max_bytes} (daemon.max_import_mb)")
    files: dict[str, Path] = {}
    total = 0
    try:
        tar = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ArchiveError(f"not a readable tar archive: {e}") from None
    with tar:
        count = 0
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                raise ArchiveError(f"damaged archive: {e}") from None
            if member is None:
                break
            count += 1
            if count > MAX_MEMBERS:
                raise ArchiveError(f"the archive has more than {MAX_MEMBERS} members; an export has at most "
                                   f"{len(_ALLOWED)}")
            name = _check_name(member)
            if member.isdir():
                if name != ADAPTER_PREFIX.rstrip("/"):
                    raise ArchiveError(f"unexpected directory {member.name!r} in the archive")
                continue
            if member.issym() or member.islnk():
                raise ArchiveError(f"archive member {member.name!r} is a link; only regular files are accepted")
            if not member.isreg():
                raise ArchiveError(f"archive member {member.name!r} is not a regular file (type {member.type!r})")
            if name not in _ALLOWED:
                raise ArchiveError(f"unexpected archive member {member.name!r}; an export holds only: "
                                   f"{', '.join(sorted(_ALLOWED))}")
            if name in files:
                raise ArchiveError(f"archive member {member.name!r} appears twice")
            limit = _member_limit(name, max_bytes)
            if member.size > limit or total + member.size > max_bytes:
                raise ArchiveError(f"archive member {member.name!r} is {member.size} bytes; the limit is "
                                   f"{min(limit, max_bytes - total)}")
            target = directory / name.replace("/", "__")
            src = tar.extractfile(member)
            if src is None:
                raise ArchiveError(f"archive member {member.name!r} cannot be read")
            written = 0
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > member.size:
                        raise ArchiveError(f"archive member {member.name!r} holds more data than its header says")
                    out.write(chunk)
            if written != member.size:
                raise ArchiveError(f"archive member {member.name!r} is truncated ({written} of {member.size} bytes)")
            total += written
            files[name] = target
    return files


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArchiveError(f"{what} is not valid JSON: {e}") from None


def _verify(directory: Path, files: dict[str, Path], task: str) -> Archive:
    if MANIFEST not in files:
        raise ArchiveError(f"the archive has no {MANIFEST}; it is not an oppu export")
    manifest = _read_json(files[MANIFEST], MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArchiveError(f"{MANIFEST}: format must be {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArchiveError(f"{MANIFEST}: format_version {manifest.get('format_version')!r} is not supported "
                           f"(this version reads {FORMAT_VERSION})")
    if manifest.get("task") != task:
        raise ArchiveError(f"{MANIFEST}: the archive holds {manifest.get('task')!r} history, but this daemon's "
                           f"task is {task!r}")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
        raise ArchiveError(f"{MANIFEST}: files must map member names to sha256 hex digests")
    present = set(files) - {MANIFEST}
    if set(listed) != present:
        missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
        raise ArchiveError(f"{MANIFEST}: files do not match the archive (missing {missing}, unlisted {extra})")
    for name in sorted(present):
        h = hashlib.sha256()
        with open(files[name], "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        if h.hexdigest() != listed[name]:
            raise ArchiveError(f"archive member {name!r}: sha256 does not match {MANIFEST}")
    if HISTORY not in files:
        raise ArchiveError(f"the archive has no {HISTORY}")
    history = []
    with open(files[HISTORY], encoding="utf-8", errors="strict") as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    history.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ArchiveError(f"{HISTORY} line {lineno}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ArchiveError(f"{HISTORY} is not UTF-8 text: {e}") from None
    if manifest.get("history_items") != len(history):
        raise ArchiveError(f"{MANIFEST}: history_items={manifest.get('history_items')!r} but {HISTORY} has "
                           f"{len(history)} items")
    profile = None
    if PROFILE in files:
        data = _read_json(files[PROFILE], PROFILE)
        if not isinstance(data, dict) or not isinstance(data.get("profile"), str) or set(data) != {"profile"}:
            raise ArchiveError(f'{PROFILE} must be {{"profile": "<text>"}}')
        if len(data["profile"]) > MAX_PROFILE_CHARS:
            raise ArchiveError(f"{PROFILE}: the profile is longer than {MAX_PROFILE_CHARS} characters")
        profile = data["profile"]
    adapter_dir = None
    adapter_members = sorted(n for n in files if n.startswith(ADAPTER_PREFIX))
    if adapter_members:
        missing = [ADAPTER_PREFIX + f for f in ADAPTER_FILES if ADAPTER_PREFIX + f not in files]
        if missing:
            raise ArchiveError(f"the archive's adapter is incomplete: {', '.join(missing)} missing")
        adapter_dir = directory / "personal"
        adapter_dir.mkdir(mode=0o700)
        for name in adapter_members:
            os.replace(files[name], adapter_dir / name[len(ADAPTER_PREFIX):])
    return Archive(directory, manifest, history, profile, adapter_dir)
