"""The machine a figure came from, and its dense matmul FLOP/s measured in the same run."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from pathlib import Path

from shared.devices import bf16_support, cpu_bf16_support


def describe() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "simd": sorted(f for f in flags if f.startswith(("avx", "amx"))),
        "cpu_bf16": cpu_bf16_support(), "memory_gib": round(_mem_total() / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "device": device,
        "bf16_compute": bf16_support(device),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _mem_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def matmul_flops(dtype: str = "float32", *, n: int = 1024, seconds: float = 1.5, device: str | None = None) -> float:
    """Dense square matmul FLOP/s with this process's threads: the median of short repeats, so a
    neighbour's burst on a shared machine moves it less than a single long timing would."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 3:
        t = time.perf_counter()
        a @ b
        sync()
        rates.append(2 * n**3 / (time.perf_counter() - t))
    return statistics.median(rates)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
