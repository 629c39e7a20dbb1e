"""shared/native_memory.py: with a fixed mmap threshold, freed large blocks go back to the OS."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest


# A process that frees an 8 MiB block (glibc then raises its mmap threshold to 8 MiB), then
# fills 1 MiB blocks with small long-lived objects between them, as a forward pass leaves
# activations between tokenizer and Python objects, and frees the blocks: prints the MiB still
# resident. argv[1] == "1": return_large_allocations() first, as load_base_model does.
_HEAP_PROBE = """
import sys
from shared.native_memory import return_large_allocations
def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS")) / 1024
if sys.argv[1] == "1":
    assert return_large_allocations()
big = b"x" * (8 << 20)
del big
before = rss()
blocks, kept = [], []
for i in range(200):
    blocks.append(b"x" * (1 << 20))
    kept.append(bytes(600 + i % 7))  # malloc, not pymalloc: lands between the blocks
del blocks
print(rss() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator on Linux")
def test_freed_large_allocations_go_back_to_the_os(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)

    def retained(call: str) -> float:
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, call], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    # glibc's own behaviour, so that the check below can tell a difference: the freed blocks stay.
    # Whether they do depends on the process's address-space layout (measured: 200 MiB kept from one
    # checkout's venv, 8 MiB from another's on the same machine, when the heap cannot grow in place
    # and glibc maps the blocks instead); with no difference to show, the check below proves nothing.
    kept_by_default = max(retained("0") for _ in range(3))
    if kept_by_default <= 150:
        pytest.skip(f"glibc returned the freed blocks by itself here ({kept_by_default:.0f} MiB kept)")
    assert retained("1") < 20
