"""Steps that carry enough tokens: token-budget batches (train.batch_tokens) and sequence packing
(train.packing) in THE training loop, and the multi-user pass that shares it."""

import random

import pytest
import torch

from shared.config import AdapterSpec, BaseModelSpec, TrainSpec
from shared.engine import Engine
from shared.training import (Example, batch_backward, collate_packed, encode_examples, length_batches, pack_rows,
                             step_plan)

# Lengths from a few tokens to a few dozen: what a history of short and long reviews gives.
EXAMPLES = [Example("Rate this review: " + "the strings sound bright and warm " * (1 + (i * 7) % 9), str(1 + i % 5))
            for i in range(14)]
# One long example and several short ones (43 to 91 tokens): two short ones share a row.
PACKABLE = [EXAMPLES[i] for i in (5, 0, 9, 4, 13, 1)]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def engine(request, tiny_model_dir):
    no_dropout = AdapterSpec(dropout=0.0)
    return Engine(BaseModelSpec(path=str(tiny_model_dir), quantization="none", dtype=request.param),
                  no_dropout, no_dropout)


def test_token_budget_batches_cover_every_example_within_the_budget(tiny_engine):
    enc = encode_examples(tiny_engine.tokenizer, EXAMPLES, 256)
    lengths = [len(e.input_ids) for e in enc]
    budget = 2 * max(lengths)
    batches = length_batches(enc, 4, random.Random(3), batch_tokens=budget)
    assert sorted(i for b in batches for i in b) == list(range(len(enc)))  # each example once per epoch
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget
    # Short examples make wider steps than long ones: rows per step follow the budget, not a count.
    widths = {len(b) for b in batches}
    assert max(widths) > 2 and len(widths) > 1
    # batch_tokens = 0 keeps the fixed count, and the same draws as before it existed.
    fixed = length_batches(enc, 4, random.Random(3))
    assert all(len(b) <= 4 for b in fixed) and sum(len(b) == 4 for b in fixed) >= 3
    rng = random.Random(3)
    two_passes = length_batches(enc, 4, rng) + length_batches(enc, 4, rng)
    assert step_plan(enc, TrainSpec(epochs=2, batch_size=4), random.Random(3)) == two_passes
    plan = step_plan(enc, TrainSpec(epochs=1, batch_size=4, batch_tokens=budget), random.Random(0))
    assert plan == length_batches(enc, 4, random.Random(0), batch_tokens=budget)


def test_batch_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match="train.batch_tokens=-1 must be >= 0"):
        TrainSpec(batch_tokens=-1)


def test_packed_rows_hold_each_example_once_and_never_mix_users(tiny_engine):
    enc = encode_examples(tiny_engine.tokenizer, EXAMPLES, 256)
    idx = list(range(len(enc)))
    rows = pack_rows(enc, idx)
    width = max(len(e.input_ids) for e in enc)
    assert sorted(i for r in rows for i in r) == idx
    assert all(sum(len(enc[i].input_ids) for i in r) <= width for r in rows)
    assert len(rows) < len(idx)  # packing saved rows
    owner = [i % 3 for i in idx]
    assert all(len({owner[i] for i in r}) == 1 for r in pack_rows(enc, idx, owner))
    ids, positions, labels = collate_packed(enc, rows, tiny_engine.tokenizer.pad_token_id, "cpu")
    assert ids.shape[1] == max(sum(len(enc[i].input_ids) for i in r) for r in rows)
    # Every example restarts at position 0; answer tokens keep their labels, nothing else has one.
    assert int((positions == 0).sum()) >= len(idx)
    assert int((labels != -100).sum()) == sum(len(e.input_ids) - e.n_prompt for e in enc)


def _grads(engine, packing, idx, enc):
    from shared.adapters import PERSONAL

    tok = engine.tokenizer
    engine.set_personal_state(_init(engine))
    engine.resume_personal_training()
    engine.model.zero_grad(set_to_none=True)
    try:
        loss, useful, answered = batch_backward(engine.model, enc, idx, tok.pad_token_id, "cpu", packing=packing)
        grads = {k: p.grad.float().clone() for k, p in engine.model.named_parameters() if f".{PERSONAL}." in k}
    finally:
        engine.model.zero_grad(set_to_none=True)
        engine.reset_personal()
    return loss, useful, answered, grads


def _init(engine):
    gen = torch.Generator().manual_seed(0)
    return {k: v + 0.02 * torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in engine._personal_init.items()}


@pytest.mark.parametrize("max_tokens", [0, 96])  # one pass, and the batch in parts (PASS_TOKENS)
def test_packing_gives_the_unpacked_loss_and_gradients(engine, max_tokens):
    """Each example attends only to itself in a packed row, so loss and gradients equal the
    padded batch's, in fp32 and in bf16 (within what bf16's rounding of other shapes allows)."""
    enc = encode_examples(engine.tokenizer, PACKABLE, 256)
    idx = list(range(6))
    assert len(pack_rows(enc, idx)) < 6  # the batch really packs
    padded = _grads(engine, False, idx, enc)
    packed = _grads(engine, True, idx, enc)
    assert packed[1:3] == padded[1:3]  # the same useful and answer tokens
    fp32 = engine.base.model.dtype == torch.float32
    # bf16: a packed row computes its attention over other shapes than a padded one, so it rounds otherwise.
    assert packed[0] == pytest.approx(padded[0], rel=1e-5 if fp32 else 2e-2)
    gap = sum(float((packed[3][k] - padded[3][k]).norm() ** 2) for k in padded[3]) ** 0.5
    size = sum(float(padded[3][k].norm() ** 2) for k in padded[3]) ** 0.5
    assert size > 0 and gap / size <= (1e-4 if fp32 else 0.05), gap / size


def test_packing_without_its_masks_would_differ(engine):
    """The check above can fail: the same packed rows with one causal mask over the whole row
    (a row's second example seeing the first) give other token losses."""
    from shared.training import answer_token_losses

    enc = encode_examples(engine.tokenizer, PACKABLE, 256)
    rows = pack_rows(enc, list(range(6)))
    assert any(len(r) > 1 for r in rows)
    ids, positions, labels = collate_packed(enc, rows, engine.tokenizer.pad_token_id, "cpu")
    engine.set_personal_state(_init(engine))
    with torch.no_grad():
        right = answer_token_losses(engine.model, ids, None, labels, positions=positions)[0]
        leaky = answer_token_losses(engine.model, ids, torch.ones_like(ids), labels)[0]
    engine.reset_personal()
    # The first examples of the rows agree exactly; the second one of a shared row moves (~4e-3 on the tiny model).
    assert float((right - leaky).abs().max()) > 1e-3


def test_group_training_packs_and_budgets_as_each_user_alone(engine):
    """The multi-user pass uses the same batching: with token budgets and packing each user's
    adapter still equals the one trained alone with the same settings."""
    users = [EXAMPLES[:9], EXAMPLES[5:12]]
    spec = TrainSpec(epochs=2, lr=1e-3, batch_size=4, batch_tokens=160, packing=True, seed=2)
    alone = []
    for ex in users:
        engine.train_personal(ex, spec, progress=False)
        alone.append({k: v.detach().clone() for k, v in engine.personal_state().items()})
    results, together = engine.train_personal_group(users, spec, progress=False)
    enc = [encode_examples(engine.tokenizer, ex, spec.max_length) for ex in users]
    assert [r.steps for r in results] == [len(step_plan(e, spec, random.Random(spec.seed))) for e in enc]
    tol = 1e-4 if engine.base.model.dtype == torch.float32 else 0.06
    for a, g in zip(alone, together):
        gap = sum(float((a[k] - g[k]).float().norm() ** 2) for k in a) ** 0.5
        moved = sum(float((a[k] - engine._personal_init[k]).float().norm() ** 2) for k in a) ** 0.5
        assert moved > 0 and gap / moved <= tol, gap / moved
