"""The only place that loads the base model.

`load_base_model` turns a BaseModelSpec into a frozen, optionally quantized model and its
tokenizer. What it relies on lives beside it, one concern a module: where the model directory
comes from (model_source: a local Hugging Face directory, or the embedded GGUF converted once),
its content hash (model_manifest), the device, dtype and threads (devices), bitsandbytes' 4-bit
layers (quant4bit), and the C heap (native_memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import environment
from .config import BaseModelSpec
from .devices import pick_device, pick_dtype, set_threads
from .model_manifest import read_or_make_manifest
from .model_source import resolve_model_dir
from .native_memory import release_memory, return_large_allocations
from .quant4bit import prepare_quantized_for_training, quantize_embeddings_nf4

# This module's only import-time side effects, both defined in shared/environment.py: offline
# before transformers is imported anywhere (nothing may be fetched from a hub), and the model
# libraries' notices that no user can act on silenced.
environment.apply()
environment.quiet_model_libraries()

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
