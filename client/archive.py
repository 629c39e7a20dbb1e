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

Reading never uses `tarfile`: `client.tarstream` streams the gzip'ed tar with every header,
member and the decompressed total capped before anything is read (only gzip is accepted; bz2,
xz and plain tar are refused by their magic bytes), so a hostile archive cannot exhaust memory.
Each allowed member is copied, within its limit, into a private directory, and its sha256 must
match the manifest. Path traversal, absolute names, links, devices, duplicates, oversized
members and a wrong or missing manifest are refused with an `ArchiveError` naming the member;
the manifest (`ExportManifest`) and the adapter's own manifest are type-checked field by field.
Nothing is unpickled: weights are later read with safetensors by `shared.adapters.load_adapter`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from shared.adapters import ADAPTER_MANIFEST, FRAMEWORK_VERSION, AdapterManifest, read_manifest
from shared.fileio import atomic_file
from shared.jsonl import json_lines
from shared.records import HistoryItem

from .tarstream import MAX_HEADER_BYTES, TarReader, TarStreamError

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
MAX_LINE_CHARS = SMALL_LIMIT  # one history item, far above what client.items accepts

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
    """Write the archive to `dest` atomically and durably (shared.fileio.atomic_file); returns its
    manifest."""
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
    with atomic_file(dest, mode=0o600) as raw:  # the user's private history; fsynced file and directory
        with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
            for name, data in sorted(blobs.items()):
                _add(tar, name, data)
    return manifest


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------- import


@dataclass(frozen=True)
class ExportManifest:
    """oppu-export.json, type-checked field by field (`parse`): nothing downstream sees a string
    where a count belongs."""

    format: str
    format_version: int
    task: str
    base_model_hash: str
    history_items: int
    files: Mapping[str, str]
    created: float | None = None
    personal_version: int | None = None
    framework_version: str | None = None

    @classmethod
    def parse(cls, data: Any) -> ExportManifest:
        if not isinstance(data, dict):
            raise ArchiveError(f"{MANIFEST} must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArchiveError(f"{MANIFEST}: unknown field(s) {', '.join(repr(k[:80]) for k in unknown[:5])}; known: "
                               f"{', '.join(sorted(known))}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise ArchiveError(f"{MANIFEST}: missing field(s) {', '.join(missing)}")
        if data["format"] != FORMAT:
            raise ArchiveError(f"{MANIFEST}: format must be {FORMAT!r}, not {data['format']!r:.80}")
        for name in ("format_version", "history_items"):
            _whole(f"{MANIFEST}: {name}", data[name], minimum=0)
        if data["format_version"] != FORMAT_VERSION:
            raise ArchiveError(f"{MANIFEST}: format_version {data['format_version']} is not supported "
                               f"(this version reads {FORMAT_VERSION})")
        for name in ("task", "base_model_hash"):
            _string(f"{MANIFEST}: {name}", data[name])
        if data.get("framework_version") is not None:
            _string(f"{MANIFEST}: framework_version", data["framework_version"])
        if data.get("personal_version") is not None:
            _whole(f"{MANIFEST}: personal_version", data["personal_version"], minimum=1)
        if data.get("created") is not None:
            _number(f"{MANIFEST}: created", data["created"])
        listed = data["files"]
        if not isinstance(listed, dict) or not all(isinstance(k, str) and isinstance(v, str) and _SHA256.match(v)
                                                   for k, v in listed.items()):
            raise ArchiveError(f"{MANIFEST}: files must map member names to sha256 hex digests")
        return cls(**data)


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _whole(what: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArchiveError(f"{what} must be a whole number >= {minimum}, not {value!r:.80}")


def _number(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ArchiveError(f"{what} must be a finite number, not {value!r:.80}")


def _string(what: str, value: Any) -> None:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ArchiveError(f"{what} must be a non-empty string of at most 256 characters, not {value!r:.80}")


def check_adapter_manifest(m: AdapterManifest, where: str) -> None:
    """The imported adapter's oppu_adapter.json: its fields are read later as counts and numbers
    (status, automatic retraining), so each must have its type now."""
    for name in ("role", "base_model_hash", "task", "peft_type", "framework_version"):
        _string(f"{where}: {name}", getattr(m, name))
    _number(f"{where}: created", m.created)
    for name, check in (("data", _whole), ("privacy", _number)):
        value = getattr(m, name)
        if not isinstance(value, dict):
            raise ArchiveError(f"{where}: {name} must be an object, not {value!r:.80}")
        for key, v in value.items():
            if check is _whole:
                _whole(f"{where}: {name}.{key}", v, minimum=0)
            else:
                _number(f"{where}: {name}.{key}", v)
    if not isinstance(m.train, dict):
        raise ArchiveError(f"{where}: train must be an object, not {m.train!r:.80}")


@dataclass
class Archive:
    """A verified archive unpacked into `directory` (deleted by `cleanup`)."""

    directory: Path
    manifest: ExportManifest
    history: list[Any]  # raw JSON objects; validated by client.items.parse_items
    profile: str | None
    adapter_dir: Path | None

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _member_limit(name: str, max_bytes: int) -> int:
    return max_bytes if name in (HISTORY, ADAPTER_PREFIX + "adapter_model.safetensors") else min(SMALL_LIMIT, max_bytes)


def _check_name(name: str) -> str:
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
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return archive


def _unpack(path: Path, directory: Path, max_bytes: int) -> dict[str, Path]:
    """Copy the allowed members out of the gzip'ed tar, streaming (client.tarstream): no header,
    member or total beyond its limit is ever held or written."""
    try:
        size = path.stat().st_size
        raw = open(path, "rb")
    except OSError as e:
        raise ArchiveError(f"cannot read the archive: {e}") from None
    with raw:
        if size > max_bytes:
            raise ArchiveError(f"the archive is {size} bytes; the limit is {max_bytes} (daemon.max_import_mb)")
        try:
            # Room for the members (capped at max_bytes below) plus their headers and padding.
            with TarReader(raw, max_stream_bytes=max_bytes + (MAX_MEMBERS + 2) * (2 * MAX_HEADER_BYTES + 2048)) as tar:
                return _copy_members(tar, directory, max_bytes)
        except TarStreamError as e:
            raise ArchiveError(str(e)) from None


def _copy_members(tar: TarReader, directory: Path, max_bytes: int) -> dict[str, Path]:
    files: dict[str, Path] = {}
    total = count = 0
    while (member := tar.next()) is not None:
        count += 1
        if count > MAX_MEMBERS:
            raise ArchiveError(f"the archive has more than {MAX_MEMBERS} members; an export has at most "
                               f"{len(_ALLOWED)}")
        name = _check_name(member.name)
        if member.kind == "directory":
            if name != ADAPTER_PREFIX.rstrip("/"):
                raise ArchiveError(f"unexpected directory {member.name!r} in the archive")
            continue
        if member.kind in ("symbolic link", "hard link"):
            raise ArchiveError(f"archive member {member.name!r} is a {member.kind}; only regular files are accepted")
        if member.kind != "file":
            raise ArchiveError(f"archive member {member.name!r} is not a regular file ({member.kind})")
        if name not in _ALLOWED:
            raise ArchiveError(f"unexpected archive member {member.name!r}; an export holds only: "
                               f"{', '.join(sorted(_ALLOWED))}")
        if name in files:
            raise ArchiveError(f"archive member {member.name!r} appears twice")
        limit = min(_member_limit(name, max_bytes), max_bytes - total)
        if member.size > limit:
            raise ArchiveError(f"archive member {member.name!r} is {member.size} bytes; the limit is {limit} "
                               f"(daemon.max_import_mb)")
        target = directory / name.replace("/", "__")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            for chunk in tar.chunks():
                out.write(chunk)
        total += member.size
        files[name] = target
    return files


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))  # at most SMALL_LIMIT bytes (_member_limit)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArchiveError(f"{what} is not valid JSON: {e}") from None


def _read_history(path: Path) -> list[Any]:
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            return [value for _, value in json_lines(_bounded_lines(fh), HISTORY)]
        except UnicodeDecodeError as e:
            raise ArchiveError(f"{HISTORY} is not UTF-8 text: {e}") from None
        except ArchiveError:
            raise
        except ValueError as e:  # a line that is not JSON
            raise ArchiveError(str(e)) from None


def _bounded_lines(fh: Any) -> Iterator[str]:
    """The file's lines, none read past MAX_LINE_CHARS (a huge line is refused, not held in memory)."""
    for lineno, line in enumerate(iter(lambda: fh.readline(MAX_LINE_CHARS + 1), ""), 1):
        if len(line) > MAX_LINE_CHARS:
            raise ArchiveError(f"{HISTORY} line {lineno} is longer than {MAX_LINE_CHARS} characters")
        yield line


def _verify(directory: Path, files: dict[str, Path], task: str) -> Archive:
    if MANIFEST not in files:
        raise ArchiveError(f"the archive has no {MANIFEST}; it is not an oppu export")
    manifest = ExportManifest.parse(_read_json(files[MANIFEST], MANIFEST))
    if manifest.task != task:
        raise ArchiveError(f"{MANIFEST}: the archive holds {manifest.task!r} history, but this daemon's "
                           f"task is {task!r}")
    listed = manifest.files
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
    history = _read_history(files[HISTORY])
    if manifest.history_items != len(history):
        raise ArchiveError(f"{MANIFEST}: history_items={manifest.history_items} but {HISTORY} has "
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
        try:
            adapter_manifest = read_manifest(adapter_dir)
        except (OSError, ValueError) as e:
            raise ArchiveError(f"{ADAPTER_PREFIX}{ADAPTER_MANIFEST}: {e}") from None
        check_adapter_manifest(adapter_manifest, ADAPTER_PREFIX + ADAPTER_MANIFEST)
    return Archive(directory, manifest, history, profile, adapter_dir)
