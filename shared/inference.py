"""THE inference path: batched greedy generation with the KV cache, prompts encoded exactly as
training encodes them (shared.prompting), answers cut at the end-of-turn marker, decoded as a
DecodingSpec says (first line only, repetition penalty, no repeated n-grams, an answer length
from the user's own history). Many users' personal adapters can share one batch (per-row
`adapter_names`, see Engine.answer_users)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from .config import DecodingSpec
from .native_memory import release_memory
from .prompting import answer_end_ids, encode_answer, encode_prompt, first_line, fit_prompt
from .quant4bit import dense_4bit_weights
from .soft_prompt import prepend

# Prompt tokens an answer sees by default (fit_prompt keeps the head and the end of a longer one).
MAX_PROMPT_TOKENS = 1024


def line_ended(text: str) -> bool:
    """Whether generated text already holds a whole non-empty first line (leading blank lines do
    not count: a model that opens with a newline has not answered yet)."""
    return "\n" in text.lstrip()


def answer_tokens(tokenizer: Any, targets: Sequence[str], cap: int, spec: DecodingSpec) -> int:
    """The answer budget for one user: `cap` (the task's max_new_tokens), or with
    spec.length_from_history > 0 that many times the longest of the user's own history answers in
    tokens (+1 for a closing token), at least 1 and never above `cap`. No history: `cap`."""
    if spec.length_from_history <= 0 or not targets:
        return cap
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets)
    return max(1, min(cap, math.ceil(spec.length_from_history * longest) + 1))


class _FirstLineStop:
    """A StoppingCriteria: a row is done once its new tokens hold a whole non-empty line."""

    def __init__(self, tokenizer: Any, start: int) -> None:
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
        import torch

        done = [line_ended(self.tokenizer.decode(row[self.start:].tolist(), skip_special_tokens=True))
                for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """Token rows as one batch padded on the left (every row ends at the right edge, where
    generation continues), with the attention mask that hides the padding."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(list(row))
        mask[r, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def label_distribution(model: Any, tokenizer: Any, prompts: Sequence[str], labels: Sequence[str],
                       **kw: Any) -> list[list[float]]:
    """Per prompt, the model's probability of each label as the whole answer (its tokens and the
    end-of-answer token, encoded exactly as training encodes a target), normalised over `labels`.
    Keywords as label_loglik's."""
    import torch

    return torch.softmax(label_loglik(model, tokenizer, prompts, labels, **kw), dim=-1).tolist()


def label_loglik(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    batch_size: int = 8,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    soft_prompt: Any = None,
    adapter_names: Sequence[str] | None = None,
) -> Any:
    """Per prompt and label, the log-likelihood of the label as the whole answer (the sum over its
    tokens and the end-of-answer token, encoded as training encodes a target; a float64 tensor,
    prompts x labels). Minus it, over the number of those tokens, is the answer loss training
    computes for that target.

    Each batch of `batch_size` prompts is run once, left-padded with position ids from the mask
    as generate() pads them, and its KV cache is shared by every label: a label costs only its
    own tokens, not another pass over the prompt. Labels of the same token length go through
    together, each prompt's cache repeated once per label (a 1-5 rating: one prompt pass and one
    one-token pass for all five, instead of one pass per label). `adapter_names`: per prompt, as
    in generate()."""
    import torch

    label_ids = [encode_answer(tokenizer, label) for label in labels]
    by_length: dict[int, list[int]] = {}
    for li, tokens in enumerate(label_ids):
        if len(tokens) > 1:
            by_length.setdefault(len(tokens), []).append(li)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    encoded = [fit_prompt(encode_prompt(tokenizer, p), max_prompt_tokens) for p in prompts]
    # Similar lengths share a batch: left padding costs compute in every row.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    logp = torch.zeros(len(prompts), len(labels), dtype=torch.float64)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = model.training
    model.eval()
    with torch.inference_mode(), dense_4bit_weights(model, enabled=device.type == "cpu"):
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            rows = len(idx)
            ids, mask = left_padded([encoded[i] for i in idx], pad_id, device)
            if soft_prompt is None:
                inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
            else:
                embeds, mask = prepend(base, soft_prompt, ids, mask)
                inputs = {"inputs_embeds": embeds, "attention_mask": mask}
            names = None if adapter_names is None else [adapter_names[i] for i in idx]
            if names is not None:
                inputs["adapter_names"] = names
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            # transformers renamed past_key_values to cache (5.x); the output names the one it takes.
            cache_key = "cache" if "cache" in out.keys() else "past_key_values"
            cache, lengths = out[cache_key], mask.sum(-1, keepdim=True)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each label's first token
            score = first[:, [tokens[0] for tokens in label_ids]].double()
            for g, (n_tokens, group) in enumerate(by_length.items()):
                # Row r * k + j: prompt r followed by the group's label j, all but its last token
                # (position t predicts token t + 1). Every row has the same length: no padding.
                k, width = len(group), n_tokens - 1
                cache.batch_repeat_interleave(k)
                step = torch.tensor([label_ids[li][:-1] for li in group], device=device).repeat(rows, 1)
                follow: dict[str, Any] = {
                    "attention_mask": torch.cat([mask.repeat_interleave(k, 0), torch.ones_like(step)], dim=1),
                    "position_ids": lengths.repeat_interleave(k, 0) + torch.arange(width, device=device),
                    cache_key: cache,
                    "use_cache": True,
                }
                if soft_prompt is None:
                    follow["input_ids"] = step
                else:
                    follow["inputs_embeds"] = base.get_input_embeddings()(step)
                if names is not None:
                    follow["adapter_names"] = [n for n in names for _ in range(k)]
                lsm = torch.log_softmax(model(**follow).logits.float(), dim=-1)
                target = torch.tensor([label_ids[li][1:] for li in group], device=device).repeat(rows, 1)
                rest = lsm.gather(2, target[..., None]).squeeze(-1).sum(-1).double().view(rows, k)
                score[:, group] += rest
                if g + 1 < len(by_length):  # back to the prompt alone, one row each, for the next group
                    cache.crop(-width)
                    cache.batch_select_indices(torch.arange(0, rows * k, k, device=device))
            logp[idx] = score.cpu()
    if was_training:
        model.train()
    return logp


def choose_label(probs: Sequence[float], labels: Sequence[str], rule: str, ordinal: bool) -> str:
    """The answer a label_choice rule picks from a distribution over `labels`. 'median' and
    'mean' need an ordered numeric scale (`ordinal`, labels in scale order); without one they
    pick the most likely label, as 'most_likely' does. Ties go to the earlier label."""
    if rule == "median" and ordinal:
        total = 0.0
        for label, q in zip(labels, probs):
            total += q
            if total >= 0.5 - 1e-12:
                return label
        return labels[-1]
    if rule == "mean" and ordinal:
        values = [float(v) for v in labels]
        mean = sum(v * q for v, q in zip(values, probs))
        return labels[min(range(len(values)), key=lambda i: (abs(values[i] - mean), i))]
    return labels[max(range(len(labels)), key=lambda i: (probs[i], -i))]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int | Sequence[int],
    decoding: DecodingSpec = DecodingSpec(),
    batch_size: int = 8,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    progress: bool | str = False,
    soft_prompt: Any = None,
    adapter_names: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    ordinal: bool = False,
) -> list[str]:
    """Greedy answers for `prompts` with whatever adapters are active on `model`
    (and a personal soft prompt in front of each prompt when given). With `adapter_names`, prompt
    i is answered by PEFT adapter `adapter_names[i]` alone, rows of one batch by different
    adapters in the same forward pass (mixed-batch serving, see Engine.answer_users).
    `max_new_tokens` is one budget for all prompts, or one per prompt (answer_tokens).
    `labels`: the task's closed answer set (`ordinal`: a rating scale in order); unless
    decoding.label_choice is 'generate', each answer is then the label that rule picks from
    label_distribution instead of generated text."""
    import torch
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    if not prompts:
        return []
    if labels and decoding.label_choice != "generate":
        dist = label_distribution(model, tokenizer, prompts, labels, batch_size=batch_size,
                                  max_prompt_tokens=max_prompt_tokens, soft_prompt=soft_prompt,
                                  adapter_names=adapter_names)
        release_memory()
        return [choose_label(p, labels, decoding.label_choice, ordinal) for p in dist]
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} max_new_tokens")
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
            ids, mask = left_padded([encoded[i] for i in idx], pad_id, device)
            if soft_prompt is None:
                inputs = {"input_ids": ids, "attention_mask": mask}
                start = ids.shape[1]  # new tokens follow the padded prompts
            else:
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                embeds, full_mask = prepend(base, soft_prompt, ids, mask)
                inputs = {"inputs_embeds": embeds, "attention_mask": full_mask}
                start = 0  # generate() returns only new tokens when given embeddings
            if adapter_names is not None:
                inputs["adapter_names"] = [adapter_names[i] for i in idx]
            if decoding.repetition_penalty != 1.0:
                inputs["repetition_penalty"] = decoding.repetition_penalty
            if decoding.no_repeat_ngram_size:
                inputs["no_repeat_ngram_size"] = decoding.no_repeat_ngram_size
            if decoding.stop_at_newline:
                inputs["stopping_criteria"] = StoppingCriteriaList([_FirstLineStop(tokenizer, start)])
            out = model.generate(
                **inputs,
                max_new_tokens=max(budgets[i] for i in idx),
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
                new = out[row, start:].tolist()[: budgets[i]]  # a row's own budget in a shared batch
                cut = next((j for j, t in enumerate(new) if t in stops), len(new))
                text = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
                answers[i] = first_line(text) if decoding.stop_at_newline else text
    if was_training:
        model.train()
    release_memory()  # the call's dense weights, KV cache and activations, back to the OS
    return answers
