"""What a model directory holds, by content: the sha256 of every file and one hash over them.

The hash of a directory is the hash of its sorted file-hash list, so two directories with the
same files have the same hash wherever they were written; protocol messages, artifact caches and
adapter manifests name a model by it. A prepared model keeps its manifest in MANIFEST, so the
hundreds of MB of weights are hashed once, not on every load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "oppu_manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def directory_manifest(directory: Path) -> dict[str, str]:
    """sha256 of every regular file under `directory` (relative posix paths), manifest excluded."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(directory).as_posix()] = sha256_file(p)
    return out


def model_hash(files: dict[str, str]) -> str:
    """One content hash for a model directory: the hash of its sorted file-hash list."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def read_or_make_manifest(model_dir: Path) -> dict[str, Any]:
    """The directory's stored manifest, else one computed now (not written: the directory may not
    be ours to write, e.g. a user's own Hugging Face checkout)."""
    mf = model_dir / MANIFEST
    if mf.exists():
        return json.loads(mf.read_text())
    files = directory_manifest(model_dir)
    return {"source": str(model_dir), "files": files, "model_hash": model_hash(files)}
