"""What the C heap keeps of the memory torch frees on a CPU, and how it goes back to the OS.

torch allocates CPU tensors with malloc; glibc decides which freed blocks return to the operating
system. Two process-wide settings keep a long-lived process (a daemon, a simulation worker) near
its working set instead of its high-water mark: large blocks mapped on their own
(return_large_allocations, when a model is loaded) and the heaps trimmed after each training run
or generation call (release_memory). Both are no-ops where the C library lacks them.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

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
