"""Shared fixtures: the embedded base model (converted once, cached like a user's), a tiny
random model with the same tokenizer for fast mechanics tests, and one real nf4 engine."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def embedded_model_dir():
    from shared.model import ensure_embedded_model

    return ensure_embedded_model(progress=False)


@pytest.fixture(scope="session")
def tiny_model_dir(embedded_model_dir, tmp_path_factory):
    """A 2-layer random Llama with the real tokenizer: same code paths, seconds not minutes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from shared.config import BaseModelSpec
    from shared.engine import Engine

    return Engine(BaseModelSpec(path=str(tiny_model_dir), quantization="none"))


@pytest.fixture(scope="session")
def real_engine():
    """The embedded SmolLM2-135M-Instruct in nf4, loaded once for all real-model tests."""
    from shared.config import BaseModelSpec
    from shared.engine import Engine

    return Engine(BaseModelSpec(quantization="nf4"))
