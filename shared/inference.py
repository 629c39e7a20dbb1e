"""THE inference path: batched greedy generation with the KV cache, prompts encoded exactly as
training encodes them (shared.prompting), answers cut at the end-of-turn marker. Many users'
personal adapters can share one batch (per-row `adapter_names`, see Engine.answer_users)."""

from __future__ import annotations

from typing import Any, Sequence

from .model import dense_4bit_weights, release_memory
from .prompting import answer_end_ids, encode_prompt, fit_prompt
from .soft_prompt import prepend


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    max_prompt_tokens: int = 1024,
    progress: bool | str = False,
    soft_prompt: Any = None,
    adapter_names: Sequence[str] | None = None,
) -> list[str]:
    """Greedy answers for `prompts` with whatever adapters are active on `model`
    (and a personal soft prompt in front of each prompt when given). With `adapter_names`, prompt
    i is answered by PEFT adapter `adapter_names[i]` alone, rows of one batch by different
    adapters in the same forward pass (mixed-batch serving, see Engine.answer_users)."""
    import torch
    from tqdm.auto import tqdm

    if not prompts:
        return []
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = answer_end_ids(tokenizer) + [tokenizer.eos_token_id]
    encoded = [fit_prompt(encode_prompt(tokenizer, p), max_prompt_tokens) for p in prompts]
    # Batch similar lengths together: left padding wastes compute on every generated token.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    desc = progress if isinstance(progress, str) else "answering"
    # On a CPU a 4-bit base would be dequantized in every forward, i.e. for every generated
    # token; dequantizing it once per call makes decoding cost what fp32 decoding costs.
    with torch.inference_mode(), dense_4bit_weights(model, enabled=device.type == "cpu"):
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[s : s + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                ids[row, width - n :] = torch.tensor(encoded[i])
                mask[row, width - n :] = 1
            ids, mask = ids.to(device), mask.to(device)
            if soft_prompt is None:
                inputs = {"input_ids": ids, "attention_mask": mask}
                start = width
            else:
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                embeds, full_mask = prepend(base, soft_prompt, ids, mask)
                inputs = {"inputs_embeds": embeds, "attention_mask": full_mask}
                start = 0  # generate() returns only new tokens when given embeddings
            if adapter_names is not None:
                inputs["adapter_names"] = [adapter_names[i] for i in idx]
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                eos_token_id=stops,
                pad_token_id=pad_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            for row, i in enumerate(idx):
                new = out[row, start:].tolist()
                cut = next((j for j, t in enumerate(new) if t in stops), len(new))
                answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    if was_training:
        model.train()
    release_memory()  # the call's dense weights, KV cache and activations, back to the OS
    return answers
