"""Resident size of the base model: nf4 against bf16 (parameters and buffers as stored)."""

from __future__ import annotations

import gc


def run(model: str = "") -> dict:
    from shared.config import BaseModelSpec
    from shared.model import load_base_model, resident_bytes

    out = {}
    for name, quant, dtype in (("nf4", "nf4", "auto"), ("bf16", "none", "bfloat16")):
        loaded = load_base_model(BaseModelSpec(quantization=quant, dtype=dtype, **({"path": model} if model else {})))
        out[name] = {"resident_bytes": resident_bytes(loaded.model), "quantization": loaded.quantization,
                     "dtype": str(loaded.dtype).replace("torch.", "")}
        del loaded
        gc.collect()
    out["nf4_vs_bf16"] = out["nf4"]["resident_bytes"] / out["bf16"]["resident_bytes"]
    return out
