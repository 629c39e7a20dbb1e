"""Honest FLOP count of training a LoRA on a frozen decoder, over useful tokens only.

Per token and layer, a frozen linear layer with P weights costs 2P FLOPs forward and 2P backward
(the activation gradient; no weight gradient since it is frozen). A LoRA of rank r on an
(in, out) layer adds 2r(in+out) forward, the same again for its input gradient and again for its
weight gradients. Causal attention at position t reads t+1 keys: QK^T and AV cost 4·t'·d forward
and twice that backward. The LM head runs only at answer positions (shared.training), forward
plus its activation gradient. Layer 0's inputs need no gradient (nothing trainable lies below),
so its q/k/v activation gradients are not counted. Padding is never counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> "Shape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads),
                   head_dim, config.vocab_size)

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        d, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def training_flops(shape: Shape, sequences: Iterable[tuple[int, int]], *, lora_r: int, lora_targets: Iterable[str]) -> float:
    """FLOPs of forward + backward over `sequences` of (tokens, answer tokens), one pass each."""
    dims = shape.linear_dims()
    targets = set(lora_targets)
    frozen = sum(i * o for i, o in dims.values())
    lora = sum(lora_r * (i + o) for name, (i, o) in dims.items() if name in targets)
    layer0_qkv = sum(dims[n][0] * dims[n][1] for n in ("q_proj", "k_proj", "v_proj"))
    attn_dim = shape.heads * shape.head_dim
    total = 0.0
    for n, answer in sequences:
        per_token = (2 * frozen + 2 * frozen) * shape.layers - 2 * layer0_qkv  # forward + activation grads
        per_token += 6 * lora * shape.layers  # forward, input grad, weight grad
        total += per_token * n
        ctx = n * (n + 1) / 2  # keys read, summed over positions
        total += 3 * 4 * attn_dim * ctx * shape.layers  # forward + 2x backward
        total += 4 * shape.vocab * shape.hidden * answer  # head forward + activation grad
    return total
