"""THE training loop: answer-only loss, deterministic with a seed, used for every adapter.

The base adapter, each personal adapter, the simulation, the federation client and the daemon
all train through `train_adapter`. Two choices matter for speed on small hardware:

- Examples are tokenized once per call and batched by length, so padding is small.
- The loss only needs logits at answer positions, so the LM head (vocabulary ~49k, about a fifth
  of SmolLM2's FLOPs and most of its activation memory) runs on those positions only.
- On a CPU a 4-bit base is dequantized once per training run, not twice per layer and step
  (shared.quant4bit.dense_4bit_weights).

Memory stays bounded: a batch goes through forward and backward in parts of at most PASS_TOKENS
tokens (batch_backward), and what a run freed is handed back to the OS when it ends.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .config import TrainSpec
from .native_memory import release_memory
from .prompting import encode_answer, encode_prompt, fit_prompt
from .quant4bit import dense_4bit_weights
from .soft_prompt import prepend


@dataclass(frozen=True)
class Example:
    """One training pair: the full prompt (context included) and the answer to learn."""

    prompt: str
    target: str


@dataclass
class Encoded:
    input_ids: list[int]
    n_prompt: int  # tokens before the answer; only later tokens carry loss


@dataclass
class TrainResult:
    steps: int
    examples: int
    epochs: float
    useful_tokens: int  # non-padding tokens processed (all epochs)
    answer_tokens: int  # tokens that carried loss (all epochs)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cancelled: bool = False

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 5):]
        return float(sum(tail) / len(tail)) if tail else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.useful_tokens / self.seconds if self.seconds else 0.0


def encode_examples(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[Encoded]:
    out = []
    for ex in examples:
        answer = encode_answer(tokenizer, ex.target)[: max_length // 2]
        prompt = fit_prompt(encode_prompt(tokenizer, ex.prompt), max_length - len(answer))
        out.append(Encoded(prompt + answer, len(prompt)))
    return out


def length_batches(encoded: list[Encoded], batch_size: int, rng: random.Random,
                   batch_tokens: int = 0) -> list[list[int]]:
    """Group examples of similar length, then shuffle the groups (less padding, still random).

    `batch_tokens` > 0: a batch is as many examples of the window as fit that many padded
    tokens (rows x the longest row, at least one example), not `batch_size` of them: short
    examples make wider steps, long ones narrower, and every step carries about as many tokens."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    # Sort within windows of a few batches so batches stay random across epochs.
    window = batch_size * 8
    batches: list[list[int]] = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s : s + window], key=lambda i: len(encoded[i].input_ids))
        if batch_tokens > 0:
            batches += pass_parts(encoded, chunk, batch_tokens)
        else:
            batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(encoded: list[Encoded], idx: list[int], pad_id: int, device: Any):
    import torch

    width = max(len(encoded[i].input_ids) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    for row, i in enumerate(idx):
        e = encoded[i]
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, e.n_prompt : n] = ids[row, e.n_prompt : n]
    return ids.to(device), mask.to(device), labels.to(device)


def pack_rows(encoded: list[Encoded], idx: list[int], owner: Sequence[int] | None = None) -> list[list[int]]:
    """Sequence packing: the examples `idx` placed into as few rows as first-fit decreasing finds,
    each row at most as long as the longest example (so a packed batch never holds more tokens
    than the padded one). With `owner`, only examples of one owner share a row (multi-user
    training: each row goes through its own user's adapter)."""
    width = max(len(encoded[i].input_ids) for i in idx)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(idx, key=lambda i: (-len(encoded[i].input_ids), i)):
        n = len(encoded[i].input_ids)
        for r, free in enumerate(room):
            if free >= n and (owner is None or owner[rows[r][0]] == owner[i]):
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(width - n)
    return rows


def collate_packed(encoded: list[Encoded], rows: list[list[int]], pad_id: int, device: Any):
    """ids, position ids and labels of packed rows (pack_rows). Each example's positions start
    at 0, which is how the model tells the examples of a row apart: its attention mask then lets
    a token see only earlier tokens of its own example (transformers' packed-sequence masks, when
    no 2D attention mask is given), so every example computes what it computes alone. A row's
    padding tail is one more such sequence, with no loss."""
    import torch

    width = max(sum(len(encoded[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e = encoded[i]
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            positions[r, at : at + n] = torch.arange(n)
            labels[r, at + e.n_prompt : at + n] = ids[r, at + e.n_prompt : at + n]
            at += n
        positions[r, at:] = torch.arange(width - at)
    return ids.to(device), positions.to(device), labels.to(device)


def collate_part(encoded: list[Encoded], part: list[int], pad_id: int, device: Any, *,
                 packing: bool) -> tuple[Any, Any, Any, Any]:
    """One pass's tensors (ids, mask, labels, positions): padded rows (positions None), or
    packed rows (mask None; pack_rows, collate_packed)."""
    if packing:
        ids, positions, labels = collate_packed(encoded, pack_rows(encoded, part), pad_id, device)
        return ids, None, labels, positions
    return (*collate(encoded, part, pad_id, device), None)


def answer_loss(model: Any, ids: Any, mask: Any, labels: Any, soft_prompt: Any = None, *,
                positions: Any = None) -> Any:
    """Mean cross-entropy over answer tokens, computing the LM head only where it is needed.

    With a `soft_prompt` (personal prompt tuning) its vectors are prepended to the embeddings
    and their positions dropped again before the head. `positions`: packed rows (collate_packed).
    """
    return answer_token_losses(model, ids, mask, labels, soft_prompt, positions=positions)[0].mean()


def answer_token_losses(model: Any, ids: Any, mask: Any, labels: Any, soft_prompt: Any = None, *,
                        positions: Any = None) -> tuple[Any, Any]:
    """Cross-entropy (fp32) of every answer token, and the batch row each one belongs to.
    `positions` (packed rows, collate_packed) replaces the padding `mask`."""
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    head = base.get_output_embeddings()
    if positions is not None:
        if soft_prompt is not None:
            raise ValueError("sequence packing does not apply to a soft prompt (prompt tuning)")
        hidden = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    elif soft_prompt is None:
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    else:
        embeds, full_mask = prepend(base, soft_prompt, ids, mask)
        hidden = decoder(inputs_embeds=embeds, attention_mask=full_mask, use_cache=False).last_hidden_state
        hidden = hidden[:, soft_prompt.shape[0]:]
    # Position t predicts token t+1: keep positions whose next token is an answer token.
    next_labels = labels[:, 1:]
    keep = next_labels != -100
    logits = head(hidden[:, :-1][keep])
    rows = keep.nonzero()[:, 0]
    return F.cross_entropy(logits.float(), next_labels[keep], reduction="none"), rows


# At most this many tokens (rows x the longest row, soft prompt included) go through one forward
# and backward pass; a larger batch is split into parts whose gradients add up to the batch's.
# Activations kept for the backward pass are what bounds a training process's memory, and they
# grow with the batch's tokens: measured on SmolLM2-135M on a CPU, about 1.2 MB per token in bf16
# and twice that in fp32, so a batch of 4 x 512 tokens alone would need 2.4-4.8 GB. Parts of 512
# tokens still give the matmuls hundreds of rows each, so splitting costs no measurable speed.
PASS_TOKENS = 512


def pass_parts(encoded: list[Encoded], idx: list[int], max_tokens: int, extra: int = 0) -> list[list[int]]:
    """Batch `idx` in parts of at most `max_tokens` padded tokens (`extra` per row: a soft
    prompt), similar lengths together, at least one row per part; the whole batch if it fits."""
    width = max(len(encoded[i].input_ids) for i in idx) + extra
    if max_tokens <= 0 or len(idx) * width <= max_tokens:
        return [list(idx)]
    parts: list[list[int]] = [[]]
    for i in sorted(idx, key=lambda i: len(encoded[i].input_ids)):
        row = len(encoded[i].input_ids) + extra  # the longest of its part so far: rows come sorted
        if parts[-1] and (len(parts[-1]) + 1) * row > max_tokens:
            parts.append([])
        parts[-1].append(i)
    return parts


def batch_backward(model: Any, encoded: list[Encoded], idx: list[int], pad_id: int, device: Any,
                   soft_prompt: Any = None, max_tokens: int = PASS_TOKENS, packing: bool = False) -> tuple[float, int, int]:
    """Forward and backward of one batch's answer-token loss (gradients accumulate into .grad).

    The batch goes through in parts (pass_parts), each part's mean loss weighted by its share of
    the batch's answer tokens, so the gradients and the loss are the whole batch's mean (up to
    rounding and dropout's draws) while the activations held are one part's. `packing`: each
    part's examples packed into rows (pack_rows; not with a soft prompt).
    Returns (loss, non-padding tokens, answer tokens).
    """
    extra = int(soft_prompt.shape[0]) if soft_prompt is not None else 0
    splits = pass_parts(encoded, idx, max_tokens, extra)
    parts = [collate_part(encoded, part, pad_id, device, packing=packing and soft_prompt is None) for part in splits]
    useful = sum(len(encoded[i].input_ids) for i in idx)
    if len(parts) == 1:
        ids, mask, labels, positions = parts[0]
        loss = answer_loss(model, ids, mask, labels, soft_prompt, positions=positions)
        loss.backward()
        return loss.item(), useful, int((labels != -100).sum())
    weights = [int((labels[:, 1:] != -100).sum()) for _, _, labels, _ in parts]
    total = sum(weights)
    value, answered = 0.0, 0
    for (ids, mask, labels, positions), n in zip(parts, weights):
        answered += int((labels != -100).sum())
        if total and not n:
            continue  # no answer token in this part: it adds nothing to the loss
        share = n / total if total else 1.0  # no answer token anywhere: the loss is NaN, as unsplit
        loss = answer_loss(model, ids, mask, labels, soft_prompt, positions=positions)
        (loss * share).backward()
        value += loss.item() * share
    return value, useful, answered


def checkpoint_steps(total: int, n: int) -> set[int]:
    """`n` evenly spaced steps in 1..total, the last one being `total`."""
    if total <= 0 or n <= 0:
        return set()
    return {max(1, math.ceil(total * j / n)) for j in range(1, n + 1)}


def step_plan(encoded: list[Encoded], spec: TrainSpec, rng: random.Random) -> list[list[int]]:
    """Which examples each step trains on: spec.epochs shuffled passes of length-grouped batches
    of spec.batch_size examples or spec.batch_tokens padded tokens (a fractional epoch: the first
    part of one more pass)."""
    full_epochs = int(spec.epochs)
    plan: list[list[int]] = []
    for _ in range(full_epochs):
        plan += length_batches(encoded, spec.batch_size, rng, spec.batch_tokens)
    frac = spec.epochs - full_epochs
    if frac > 0:
        extra = length_batches(encoded, spec.batch_size, rng, spec.batch_tokens)
        plan += extra[: max(1, round(len(extra) * frac))]
    return plan


def make_optimizer(params: Sequence[Any], spec: TrainSpec, total: int,
                   wrap: Callable[[Any], Any] | None = None) -> tuple[Any, Any]:
    """AdamW and its linear-warmup schedule over `total` steps (`wrap`: e.g. DP-SGD's optimizer)."""
    import torch

    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if wrap is not None:
        opt = wrap(opt)
    warm = int(total * spec.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


def train_adapter(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    spec: TrainSpec,
    params: Sequence[Any],
    *,
    progress: bool | str = True,
    on_step: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    soft_prompt: Any = None,
    dp_sgd: Any = None,
    checkpoints: int = 0,
    on_checkpoint: Callable[[int, int], None] | None = None,
    pass_tokens: int = PASS_TOKENS,
) -> TrainResult:
    """Train `params` (the trainable adapter's tensors) on `examples` with answer-only loss.

    The caller activates the adapters and marks which are trainable (see shared.adapters).
    `on_step(step, total, loss)` reports progress; `should_stop()` cancels between steps.
    `soft_prompt`, when given, is prepended to every example (it is then among `params`).
    `dp_sgd` (a shared.dpsgd.DPSGD) makes it record-level DP-SGD: Poisson batches, per-example
    clipping and noise by Opacus's DPOptimizer (then spec.max_grad_norm is not used).
    `on_checkpoint(step, total)` is called after `checkpoints` evenly spaced steps, the last one
    after the final step (per-user validation, shared.selection); it may run eval-mode forwards
    and must leave the model as it found it. `pass_tokens` bounds one forward/backward pass
    (batch_backward; 0: whole batches).
    """
    import torch
    from tqdm.auto import tqdm

    params = [p for p in params if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: activate an adapter with trainable=<name> first")
    if not examples:
        return TrainResult(0, 0, spec.epochs, 0, 0)
    device = params[0].device
    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)  # dropout masks
    encoded = encode_examples(tokenizer, examples, spec.max_length)

    plan = step_plan(encoded, spec, rng) if dp_sgd is None else dp_sgd.plan(len(encoded), spec.epochs)
    total = len(plan)
    check_at = checkpoint_steps(total, checkpoints) if on_checkpoint is not None else set()
    opt, sched = make_optimizer(params, spec, total, wrap=dp_sgd.wrap_optimizer if dp_sgd is not None else None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    model.train()
    result = TrainResult(0, len(examples), spec.epochs, 0, 0)
    desc = progress if isinstance(progress, str) else "training"
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step")
    start = time.perf_counter()
    frozen = contextlib.ExitStack()
    try:
        frozen.enter_context(dense_4bit_weights(model, enabled=device.type == "cpu"))
        for step, idx in enumerate(plan):
            if should_stop is not None and should_stop():
                result.cancelled = True
                break
            if dp_sgd is not None:  # per-example gradients; an empty Poisson batch still steps
                opt.zero_grad(set_to_none=True)
                value = dp_sgd.backward(
                    lambda i: answer_loss(model, *collate(encoded, [i], pad_id, device), soft_prompt), idx, params)
                useful = sum(len(encoded[i].input_ids) for i in idx)
                answered = sum(len(encoded[i].input_ids) - encoded[i].n_prompt for i in idx)
            else:
                opt.zero_grad(set_to_none=True)
                value, useful, answered = batch_backward(model, encoded, idx, pad_id, device, soft_prompt,
                                                         pass_tokens, packing=spec.packing)
            if value is not None and not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {step}; lower train.lr")
            if dp_sgd is None and spec.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            opt.step()
            sched.step()
            result.steps += 1
            if value is not None:
                result.losses.append(float(value))
            result.useful_tokens += useful
            result.answer_tokens += answered
            bar.update(1)
            if value is not None:
                bar.set_postfix(loss=f"{value:.3f}")
            if on_step is not None:
                on_step(step + 1, total, float(value) if value is not None else float("nan"))
            if step + 1 in check_at:
                on_checkpoint(step + 1, total)
    finally:
        frozen.close()
        bar.close()
        model.eval()
        result.seconds = time.perf_counter() - start
        release_memory()  # the run's activations and dense weights, back to the OS
    return result
