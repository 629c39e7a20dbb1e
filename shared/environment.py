"""The process environment oppu needs, set in one place before any third-party library reads it.

Every entry point (the `oppu` command, the Flower ServerApp and ClientApp, the test suite) calls
`apply()` first; shared.model (the base-model loader) calls it and `quiet_model_libraries()` on
import too, its only import-time side effects, so a library user who loads a model without going
through an entry point is offline as well. Values are defaults: a variable the user set is kept.
"""

from __future__ import annotations

import logging
import os
import warnings

DEFAULTS = {
    # Nothing is ever fetched from a model hub (read by huggingface_hub when it is imported).
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # Chroma's telemetry, and the tokenizers warning about fork after parallelism.
    "ANONYMIZED_TELEMETRY": "False",
    "TOKENIZERS_PARALLELISM": "false",
    # Flower's telemetry and update check reach the network.
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Ray's notice about a future default, printed on every simulation; oppu asks for no GPUs then.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # torch's CPU matmuls (oneDNN, and ideep above it) cache a compiled kernel for every input
    # shape, up to 1024 of each by default, and training sees a new shape with every new batch
    # length: a process grew by about 11 MB per new length (SmolLM2-135M, bf16) up to about a
    # gigabyte, i.e. with every user it served. 64 recent shapes keep the reuse within a run (a
    # training step's layers, a generation's decode steps) at a bounded cost. Read when the first
    # kernel is built.
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",
    "LRU_CACHE_CAPACITY": "64",
}


def apply() -> None:
    """Set every DEFAULTS variable the environment does not set already (idempotent)."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


def quiet_model_libraries() -> None:
    """Silence what the model libraries print on every use that no user can act on.

    bitsandbytes warns on every import that an optional CPU kernel package is absent, and PEFT
    trips a transformers deprecation warning on every wrap; a dependency uses a deprecated
    torch.jit decorator, printed once per process at load time.
    """
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # A quantized artifact (the coordinator's nf4 export) carries its own quantization config;
    # transformers warns that the one passed at load is ignored.
    warnings.filterwarnings("ignore", message=".*already has a `quantization_config` attribute.*")
    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*is deprecated", category=DeprecationWarning)
