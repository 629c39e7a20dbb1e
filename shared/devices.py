"""Where and in what precision the base model computes: the device, the compute dtype (bf16 only
where the hardware multiplies it), and torch's CPU threads."""

from __future__ import annotations

import os
from pathlib import Path

from .config import DTYPES, BaseModelSpec

# Overrides base_model.dtype = "auto" for every model this process (and its children) loads,
# e.g. to run on an AMX machine what an AVX2-only one computes (tests: --compute-dtype).
COMPUTE_DTYPE_ENV = "OPPU_COMPUTE_DTYPE"


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
