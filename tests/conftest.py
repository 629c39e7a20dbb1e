"""Shared fixtures: the embedded base model (converted once, cached like a user's), a tiny
random model with the same tokenizer for fast mechanics tests, and one real nf4 engine.

Compute dtype: engines compute in bf16 on CPUs that have it in hardware (AMX, AVX512-BF16) and
in fp32 elsewhere (shared.devices.pick_dtype). `--compute-dtype=float32|bfloat16` forces one for
every model the run loads, in this process and in the processes it starts (OPPU_COMPUTE_DTYPE),
so either machine can run what the other computes; `dtype_engine` runs a numerics test in both.
"""

from __future__ import annotations

import os

from shared import environment

environment.apply()

import pytest

COMPUTE_DTYPES = ("float32", "bfloat16")


def pytest_addoption(parser):
    parser.addoption(
        "--compute-dtype", choices=("auto",) + COMPUTE_DTYPES, default=None,
        help="compute dtype of every model loaded with base_model.dtype='auto' (default: the "
             "environment's OPPU_COMPUTE_DTYPE, else auto: bf16 where the CPU has it in hardware)",
    )


def pytest_configure(config):
    forced = config.getoption("--compute-dtype")
    if forced:
        os.environ["OPPU_COMPUTE_DTYPE"] = forced  # inherited by the daemons and clients tests start


def pytest_report_header(config):
    from shared.config import BaseModelSpec
    from shared.devices import pick_dtype

    return f"oppu compute dtype: {str(pick_dtype(BaseModelSpec(), 'cpu')).replace('torch.', '')} on cpu"


@pytest.fixture(scope="session")
def embedded_model_dir():
    from shared.model_source import ensure_embedded_model

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


@pytest.fixture(scope="session", params=COMPUTE_DTYPES)
def dtype_engine(request, tiny_model_dir):
    """The tiny engine computing in fp32, then in bf16, whatever this machine picks by itself:
    numerics (mixed batch = one user, tolerances) must hold in both. Emulated bf16 on a CPU
    without it is slow, but a 2-layer, 64-wide model stays cheap."""
    from shared.config import BaseModelSpec
    from shared.engine import Engine

    return Engine(BaseModelSpec(path=str(tiny_model_dir), quantization="none", dtype=request.param))


@pytest.fixture()
def varied(dtype_engine):
    """The tiny engine (fp32, then bf16) with a random base adapter of scale 1, restored after:
    its greedy answers and label likelihoods then differ from prompt to prompt."""
    import torch

    e = dtype_engine
    before = {k: v.clone() for k, v in e.base_state().items()}
    g = torch.Generator().manual_seed(1)
    e.set_base_state({k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in before.items()})
    yield e
    e.set_base_state(before)
