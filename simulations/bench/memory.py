"""Resident size of the base model: nf4 against bf16 (parameters, buffers and 4-bit statistics as
stored); also nf4 with the token embedding left unquantized, as bitsandbytes alone leaves it."""

from __future__ import annotations

import gc

from shared.config import BaseModelSpec
from shared.model import load_base_model
from shared.quant4bit import resident_bytes


def run(model: str = "") -> dict:
    out = {}
    for name, quant, dtype, emb in (("nf4", "nf4", "auto", True), ("nf4_embeddings_unquantized", "nf4", "auto", False),
                                    ("bf16", "none", "bfloat16", True)):
        spec = BaseModelSpec(quantization=quant, dtype=dtype, quantize_embeddings=emb, **({"path": model} if model else {}))
        loaded = load_base_model(spec)
        out[name] = {"resident_bytes": resident_bytes(loaded.model), "quantization": loaded.quantization,
                     "dtype": str(loaded.dtype).replace("torch.", "")}
        del loaded
        gc.collect()
    out["nf4_vs_bf16"] = out["nf4"]["resident_bytes"] / out["bf16"]["resident_bytes"]
    return out
