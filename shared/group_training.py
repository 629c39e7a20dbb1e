"""Several users' personal LoRA adapters trained in one pass (multi-LoRA training).

Why: one user's step multiplies a batch of ~4 x 100 tokens by 576-wide matrices, which leaves
fast matrix units (AMX, any GPU) waiting on per-step overhead. In OPPU the natural source of
more tokens per step is other users: K users' batches go through the frozen base model
together, and each row adds only its own user's LoRA delta (S-LoRA / Punica / mLoRA style:
the A and B matrices of the K users stacked and gathered by row). PEFT's `adapter_names` does
this for inference only, so the per-row delta here is a forward hook on every LoRA layer.

Each user keeps everything that makes its training its own: its batches (the same plan, from
the same seed, as when trained alone), its loss normalisation (the mean over *its* answer
tokens in the step), its gradient clipping, its AdamW state and learning-rate schedule. A user
whose plan is done drops out of the group; the others go on. So a user's adapter equals, up to
rounding, the adapter Engine.train_personal gives it alone (tests/shared/test_group_training.py),
and no user's loss reaches another user's tensors (the gather's backward only adds into the
rows it read).

Dropout is the one thing not reproduced draw for draw: the rows of a group take their dropout
masks from one stream. With dropout > 0 the group trains each user on a statistically
identical, not bitwise identical, path.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .config import TrainSpec
from .native_memory import release_memory
from .quant4bit import dense_4bit_weights
from .training import (PASS_TOKENS, Encoded, Example, TrainResult, answer_token_losses, checkpoint_steps, collate,
                       collate_packed, encode_examples, make_optimizer, pack_rows, pass_parts, step_plan)


@dataclass
class _Layer:
    module: Any
    a_key: str
    b_key: str
    scaling: float
    dropout: Any


class GroupLoRA:
    """K users' copies of one LoRA slot as separate leaf tensors, added per row by forward hooks.

    `rows` (a LongTensor of user indices, one per batch row) is set only while a group batch
    goes through the model; any other forward (validation, answers through PEFT's own slots)
    sees the hooks do nothing.
    """

    def __init__(self, pm: Any, slot: str, init_state: dict[str, Any], k: int) -> None:
        from peft.tuners.lora import LoraLayer

        self.layers: list[_Layer] = []
        for name, module in pm.named_modules():
            if isinstance(module, LoraLayer) and slot in getattr(module, "lora_A", {}):
                if getattr(module, "use_dora", {}).get(slot, False):
                    raise ValueError("multi-user training supports plain LoRA personal adapters, not DoRA")
                self.layers.append(_Layer(module, f"{name}.lora_A.weight", f"{name}.lora_B.weight",
                                          float(module.scaling[slot]), module.lora_dropout[slot]))
        covered = {key for layer in self.layers for key in (layer.a_key, layer.b_key)}
        if not self.layers or covered != set(init_state):
            extra = sorted(set(init_state) - covered)[:3]
            raise ValueError(f"multi-user training needs a personal slot made only of LoRA A/B matrices "
                             f"(found {len(self.layers)} LoRA layers; other tensors: {extra})")
        self.users = [{key: v.detach().clone().requires_grad_(True) for key, v in init_state.items()}
                      for _ in range(k)]
        self.rows: Any = None
        self._handles: list[Any] = []

    def parameters(self, user: int) -> list[Any]:
        return list(self.users[user].values())

    def state(self, user: int) -> dict[str, Any]:
        return {key: v.detach().clone() for key, v in self.users[user].items()}

    def _delta(self, layer: _Layer, x: Any, out: Any) -> Any:
        import torch

        rows = self.rows
        a = torch.stack([u[layer.a_key] for u in self.users])[rows]  # (batch, r, in)
        b = torch.stack([u[layer.b_key] for u in self.users])[rows]  # (batch, out, r)
        x = layer.dropout(x.to(a.dtype))
        h = torch.bmm(x, a.transpose(1, 2))  # as lora_A(x): (batch, tokens, r)
        return out + (torch.bmm(h, b.transpose(1, 2)) * layer.scaling).to(out.dtype)

    def __enter__(self) -> "GroupLoRA":
        for layer in self.layers:
            hook = (lambda module, args, out, layer=layer:
                    out if self.rows is None else self._delta(layer, args[0], out))
            self._handles.append(layer.module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.rows = None


def group_backward(model: Any, group: GroupLoRA, encoded: list[Encoded], owner: list[int], idx: list[int],
                   answer_tokens: dict[int, int], pad_id: int, device: Any,
                   max_tokens: int = PASS_TOKENS, packing: bool = False) -> dict[int, float]:
    """Forward and backward of one group step: rows `idx` of the pooled `encoded` examples, row
    i belonging to user owner[i]. Each user's loss is the mean over its own answer tokens of the
    step (`answer_tokens[user]`), and the step minimises the sum of those means, so each user's
    gradient is the one its own batch would give. The rows go through in parts of at most
    `max_tokens` padded tokens (memory; see shared.training.PASS_TOKENS); `packing` packs each
    part's rows, one user's examples to a row (shared.training.pack_rows).
    Returns {user: loss}."""
    import torch

    losses: dict[int, float] = {u: 0.0 for u in answer_tokens}
    for part in pass_parts(encoded, idx, max_tokens):
        if packing:
            packed = pack_rows(encoded, part, owner)
            ids, positions, labels = collate_packed(encoded, packed, pad_id, device)
            mask, rows = None, [owner[row[0]] for row in packed]
        else:
            ids, mask, labels = collate(encoded, part, pad_id, device)
            positions, rows = None, [owner[i] for i in part]
        users = torch.tensor(rows, device=device)
        group.rows = users
        try:
            token_losses, token_rows = answer_token_losses(model, ids, mask, labels, positions=positions)
        finally:
            group.rows = None
        token_users = users[token_rows]
        weights = torch.zeros_like(token_losses)
        for u, n in answer_tokens.items():
            if n:
                weights[token_users == u] = 1.0 / n
        (token_losses * weights).sum().backward()
        for u in answer_tokens:
            picked = token_users == u
            if bool(picked.any()):
                losses[u] += float((token_losses[picked] * weights[picked]).sum().detach())
    return losses


def train_group(
    model: Any,
    tokenizer: Any,
    users: Sequence[Sequence[Example]],
    spec: TrainSpec,
    group: GroupLoRA,
    *,
    progress: bool | str = True,
    should_stop: Callable[[], bool] | None = None,
    checkpoints: int = 0,
    on_checkpoint: Callable[[int, int, int], None] | None = None,
    pass_tokens: int = PASS_TOKENS,
) -> list[TrainResult]:
    """Train every user's adapter in `group` on that user's examples, all users in each step.

    User k's steps are exactly its own plan (shared.training.step_plan with spec.seed, as
    train_adapter would draw it); step s of the group holds step s of every user that still has
    one. `on_checkpoint(user, step, total)` is called after `checkpoints` evenly spaced steps of
    each user (the user's own total), with the model in train mode and the group's hooks idle:
    it may score the user's adapter through the engine (group.state(user)) and must leave the
    model's active adapters as it found them."""
    import torch
    from tqdm.auto import tqdm

    k = len(users)
    results = [TrainResult(0, len(ex), spec.epochs, 0, 0) for ex in users]
    params = [group.parameters(u) for u in range(k)]
    device = params[0][0].device
    torch.manual_seed(spec.seed)  # dropout masks
    encoded: list[Encoded] = []
    owner: list[int] = []
    plans: list[list[list[int]]] = []
    for u, examples in enumerate(users):
        own = encode_examples(tokenizer, examples, spec.max_length)
        offset = len(encoded)
        encoded += own
        owner += [u] * len(own)
        plan = step_plan(own, spec, random.Random(spec.seed)) if own else []
        plans.append([[offset + i for i in batch] for batch in plan])
    totals = [len(p) for p in plans]
    check_at = [checkpoint_steps(t, checkpoints) if on_checkpoint is not None else set() for t in totals]
    opts = [make_optimizer(params[u], spec, totals[u]) for u in range(k)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    model.train()
    desc = progress if isinstance(progress, str) else f"training {k} users"
    bar = tqdm(total=max(totals, default=0), desc=desc, disable=not progress, leave=False, unit="step")
    start = time.perf_counter()
    frozen = contextlib.ExitStack()
    try:
        frozen.enter_context(dense_4bit_weights(model, enabled=device.type == "cpu"))
        for step in range(max(totals, default=0)):
            if should_stop is not None and should_stop():
                for u, r in enumerate(results):
                    r.cancelled = r.steps < totals[u]
                break
            active = [u for u in range(k) if step < totals[u]]
            idx = [i for u in active for i in plans[u][step]]
            answer_tokens = {u: sum(len(encoded[i].input_ids) - encoded[i].n_prompt for i in plans[u][step])
                             for u in active}
            for u in active:
                opts[u][0].zero_grad(set_to_none=True)
            losses = group_backward(model, group, encoded, owner, idx, answer_tokens, pad_id,
                                    device, pass_tokens, packing=spec.packing)
            for u in active:
                value = losses[u]
                if not math.isfinite(value):
                    raise FloatingPointError(f"training loss of user {u} became {value} at step {step}; "
                                             "lower train.lr")
                if spec.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params[u], spec.max_grad_norm)
                opt, sched = opts[u]
                opt.step()
                sched.step()
                r = results[u]
                r.steps += 1
                r.losses.append(value)
                rows = plans[u][step]
                r.useful_tokens += sum(len(encoded[i].input_ids) for i in rows)
                r.answer_tokens += sum(len(encoded[i].input_ids) - encoded[i].n_prompt for i in rows)
            bar.update(1)
            for u in active:
                if step + 1 in check_at[u]:
                    on_checkpoint(u, step + 1, totals[u])
                    model.train()
    finally:
        frozen.close()
        bar.close()
        model.eval()
        seconds = time.perf_counter() - start
        for r in results:
            r.seconds = seconds  # the users shared every second of it
        release_memory()
    return results
