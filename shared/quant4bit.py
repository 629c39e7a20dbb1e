"""bitsandbytes' 4-bit layers, made to do what oppu needs of them on a CPU.

bitsandbytes quantizes linear layers only and is built for CUDA; on a CPU three things need help:
the vocabulary matrix stays unquantized (quantize_embeddings_nf4), 4-bit layers repack into a
layout without input gradients (prepare_quantized_for_training), and every use dequantizes the
weight again (dense_4bit_weights). bitsandbytes is imported only when one of these runs, so
modules that merely import them stay light; without bitsandbytes each is a no-op.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


def quantize_embeddings_nf4(model: Any, compute_dtype: Any) -> bool:
    """Store the token embedding, and the LM head tied to it, in nf4 (one shared 4-bit tensor).

    bitsandbytes quantizes linear layers only; in a small model the vocabulary matrix is a fifth
    of the weights (SmolLM2-135M: 28M of 135M), so leaving it in 16/32 bits would keep most of
    the memory that nf4 is there to save. Looking up a row dequantizes that row only (576 is a
    multiple of the 64-wide quantization block); the head dequantizes on use, and we run it on
    answer positions only. Returns False (and changes nothing) where this does not apply.
    """
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is not torch.nn.Embedding or emb.embedding_dim % 64:
        return False
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    if head is not None and not tied:
        return False  # an untied head is a separate matrix; keep it as loaded
    _Embedding4bit = _embedding_4bit_class()
    device = emb.weight.device
    weight = bnb.nn.Params4bit(emb.weight.data.to(compute_dtype), requires_grad=False, quant_type="nf4",
                               blocksize=64, compress_statistics=False).to(device)
    new_emb = _Embedding4bit(emb.num_embeddings, emb.embedding_dim, dtype=compute_dtype,
                             quant_type="nf4", device="meta")
    new_emb.weight = weight
    new_emb.dtype = compute_dtype
    model.set_input_embeddings(new_emb)
    if head is not None:
        new_head = bnb.nn.Linear4bit(emb.embedding_dim, emb.num_embeddings, bias=False, compute_dtype=compute_dtype,
                                     quant_type="nf4", device="meta")
        new_head.weight = weight  # still tied: one 4-bit tensor for both
        model.set_output_embeddings(new_head)
    return True


def _embedding_4bit_class() -> Any:
    import bitsandbytes as bnb
    import torch

    class Embedding4bit(bnb.nn.Embedding4bit):
        """bitsandbytes' 4-bit embedding, whose state_dict() (PEFT reads it to pick out adapter
        tensors) holds the packed weight instead of raising."""

        def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
            torch.nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    return Embedding4bit


@contextmanager
def dense_4bit_weights(model: Any, enabled: bool = True) -> Iterator[int]:
    """On a CPU, run each 4-bit layer from a weight dequantized once for a whole training run or
    generation call.

    bitsandbytes dequantizes a 4-bit weight on every use: in the forward and again in the
    backward of every training step (about a seventh of a step of SmolLM2-135M on a CPU), and in
    every forward of generation, i.e. once per generated token, where it costs far more than the
    token's own arithmetic. The frozen weights do not change meanwhile, so we dequantize them
    once (extra memory: the weights in the compute dtype, for that call only; the resident model
    stays 4-bit). On CUDA bitsandbytes' kernels are fast and memory scarce, so callers leave this
    off there. Yields the number of layers switched.
    """
    import torch
    import torch.nn.functional as F

    layers = []
    if enabled:
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is not None:
            # Layers already switched by an enclosing call (validation inside a training run)
            # keep that call's dense weight: no second copy, and its exit restores them.
            layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and "forward" not in m.__dict__]
    dense: dict[int, Any] = {}
    try:
        for m in layers:
            w = m.weight
            key = id(w)  # a tied head shares its embedding's 4-bit tensor: dequantize it once
            if key not in dense:
                dense[key] = bnb.functional.dequantize_4bit(w.data, w.quant_state).to(m.compute_dtype or torch.float32)
            weight = dense[key]
            m.forward = (lambda x, weight=weight, bias=m.bias: F.linear(x.to(weight.dtype), weight, bias).to(x.dtype))
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)


def prepare_quantized_for_training(model: Any) -> int:
    """Keep bitsandbytes' CPU 4-bit layers trainable-through.

    On CPU, after any no-grad forward in eval mode, bitsandbytes repacks 4-bit weights into an
    inference-only layout whose backward yields no input gradient, so LoRA weights silently
    stop getting gradients. Turning off that fast path on every Linear4bit keeps the layout
    that supports backward. Returns the number of layers touched.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def resident_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers as stored (4-bit packed where quantized),
    plus the 4-bit layers' quantization statistics (absmax per block), which are neither."""
    seen, extra = set(), 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None and id(state) not in seen:
            seen.add(id(state))
            extra += state.absmax.numel() * state.absmax.element_size()
    return int(model.get_memory_footprint()) + extra
