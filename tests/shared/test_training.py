"""The one training loop: answer-only loss, determinism, the nf4 gradient trap, isolation."""

import pytest
import torch

from shared.config import TrainSpec
from shared.training import Example, answer_loss, collate, encode_examples

EXAMPLES = [Example(f"Rate this review: the strings number {i} sound bright", str(1 + i % 5)) for i in range(12)]


def test_loss_only_on_answer_tokens(tiny_engine):
    tok = tiny_engine.tokenizer
    enc = encode_examples(tok, EXAMPLES[:2], 256)
    ids, mask, labels = collate(enc, [0, 1], tok.pad_token_id, "cpu")
    for row, e in enumerate(enc):
        assert (labels[row, : e.n_prompt] == -100).all()
        answer = labels[row, e.n_prompt : len(e.input_ids)]
        assert (answer != -100).all()
        # The answer is the target's tokens followed by the end-of-turn marker.
        assert tok.decode(answer[:-1]) == EXAMPLES[row].target
    assert (labels[mask == 0] == -100).all()


def test_head_on_answer_positions_equals_full_loss(dtype_engine):
    """Computing the LM head only where the answer is gives the same loss as the full model, in
    fp32 and in bf16 (same rows through the same head, cross-entropy in fp32 in both)."""
    tok = dtype_engine.tokenizer
    enc = encode_examples(tok, EXAMPLES[:4], 256)
    ids, mask, labels = collate(enc, [0, 1, 2, 3], tok.pad_token_id, "cpu")
    model = dtype_engine.model
    model.eval()
    with torch.no_grad():
        ours = answer_loss(model, ids, mask, labels)
        full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(ours, full, atol=1e-5)


def test_training_is_deterministic_and_changes_only_personal(tiny_engine):
    spec = TrainSpec(epochs=1, lr=1e-3, batch_size=4, seed=3)
    base_before = {k: v.clone() for k, v in tiny_engine.base_state().items()}
    tiny_engine.train_personal(EXAMPLES, spec, progress=False)
    first = {k: v.clone() for k, v in tiny_engine.personal_state().items()}
    tiny_engine.train_personal(EXAMPLES, spec, progress=False)
    second = tiny_engine.personal_state()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(torch.equal(base_before[k], v) for k, v in tiny_engine.base_state().items())
    assert any(not torch.equal(first[k], tiny_engine._personal_init[k]) for k in first)


def test_users_are_isolated(tiny_engine):
    """User B's adapter is the same whether or not user A trained before in this process
    (the published OPPU script accumulates earlier users' data; we must not)."""
    spec = TrainSpec(epochs=1, lr=1e-3, batch_size=4, seed=0)
    user_a = [Example(f"Tag this movie: a space opera {i}", "sci-fi") for i in range(8)]
    user_b = EXAMPLES[:8]
    tiny_engine.train_personal(user_b, spec, progress=False)
    alone = {k: v.clone() for k, v in tiny_engine.personal_state().items()}
    tiny_engine.train_personal(user_a, spec, progress=False)
    tiny_engine.train_personal(user_b, spec, progress=False)
    after_a = tiny_engine.personal_state()
    assert all(torch.equal(alone[k], after_a[k]) for k in alone)


def test_cancellation_and_progress(tiny_engine):
    seen = []
    r = tiny_engine.train_personal(
        EXAMPLES, TrainSpec(epochs=2, batch_size=2), progress=False,
        on_step=lambda s, total, loss: seen.append((s, total)), should_stop=lambda: len(seen) >= 3,
    )
    assert r.cancelled and r.steps == 3 and seen[-1] == (3, 12)


@pytest.mark.realmodel
def test_nf4_lora_weights_change_after_an_eval_forward(real_engine):
    """The CPU bitsandbytes trap: an eval-mode no-grad forward repacks 4-bit weights and LoRA
    gradients silently vanish unless support_avx512bf16_for_cpu is off. This fails if they do."""
    real_engine.answer(["Say hello."], max_new_tokens=2, personal=True)  # eval, no-grad forward
    real_engine.reset_personal()
    init = {k: v.clone() for k, v in real_engine.personal_state().items()}
    r = real_engine.train_personal(EXAMPLES[:4], TrainSpec(epochs=1, batch_size=4, lr=1e-3), fresh=False,
                                   progress=False)
    assert r.steps == 1
    after = real_engine.personal_state()
    lora_b = [k for k in after if "lora_B" in k]
    assert lora_b and all(not torch.equal(init[k], after[k]) for k in lora_b)


def test_examples_are_tokenized_once_per_user_not_per_epoch(tiny_engine, monkeypatch):
    import shared.training as training

    calls = []
    real = training.encode_prompt
    monkeypatch.setattr(training, "encode_prompt", lambda tok, p: calls.append(p) or real(tok, p))
    r = tiny_engine.train_personal(EXAMPLES[:6], TrainSpec(epochs=3, batch_size=2), progress=False)
    assert r.steps == 9 and len(calls) == 6


@pytest.mark.realmodel
def test_dense_4bit_weights_give_the_same_loss_and_are_restored(real_engine):
    """Training on a CPU runs 4-bit layers from weights dequantized once; the loss and its
    gradients are those of the 4-bit layers, and the layers are 4-bit again afterwards."""
    from shared import adapters
    from shared.quant4bit import dense_4bit_weights

    e = real_engine
    enc = encode_examples(e.tokenizer, EXAMPLES[:2], 128)
    ids, mask, labels = collate(enc, [0, 1], e.tokenizer.pad_token_id, "cpu")
    adapters.activate(e.model, [adapters.BASE, adapters.PERSONAL], trainable=adapters.PERSONAL)
    params = adapters.trainable_parameters(e.model, adapters.PERSONAL)
    try:
        e.model.eval()
        e.model.zero_grad(set_to_none=True)  # earlier training leaves its last gradients
        grads = []
        for dense in (False, True):
            with dense_4bit_weights(e.model, enabled=dense) as n:
                loss = answer_loss(e.model, ids, mask, labels)
                loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in params]))
            e.model.zero_grad(set_to_none=True)
        assert n >= 200
        assert torch.allclose(grads[0][0], grads[1][0], atol=1e-4)
        assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(grads[0][1], grads[1][1]))
        import bitsandbytes as bnb

        assert not any("forward" in m.__dict__ for m in e.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    finally:
        adapters.activate(e.model, [adapters.BASE])


def test_batch_parts_are_bounded_cover_the_batch_and_group_similar_lengths(tiny_engine):
    from shared.training import pass_parts

    texts = [("word " * n).strip() for n in (3, 40, 5, 38, 4, 41, 6, 39)]
    enc = encode_examples(tiny_engine.tokenizer, [Example(t, "ok") for t in texts], 256)
    idx = list(range(len(enc)))
    width = max(len(e.input_ids) for e in enc)
    assert pass_parts(enc, idx, len(idx) * width) == [idx]  # fits: one pass, in the batch's order
    assert pass_parts(enc, idx, 0) == [idx]
    limit = 3 * width  # the four short rows fit in one pass, the four long ones need two
    parts = pass_parts(enc, idx, limit, extra=4)
    assert sorted(i for p in parts for i in p) == idx
    assert all(len(p) * (max(len(enc[i].input_ids) for i in p) + 4) <= limit for p in parts if len(p) > 1)
    short = {i for i in idx if len(enc[i].input_ids) < width / 1.5}
    assert short in [set(p) for p in parts] and len(parts) == 3  # short rows together, not padded to long
    assert pass_parts(enc, idx, 1) == [[i] for i in sorted(idx, key=lambda i: len(enc[i].input_ids))]


@pytest.mark.parametrize("max_tokens", [1, 90])  # one row per pass; the two short rows together
def test_a_batch_in_parts_has_the_whole_batchs_loss_and_gradients(dtype_engine, max_tokens):
    """Bounding a pass's tokens (the memory of training on long inputs) changes neither the loss
    nor the gradients of a step, in fp32 and bf16: the parts' losses are weighted by their share
    of the batch's answer tokens."""
    from shared import adapters
    from shared.training import batch_backward

    e = dtype_engine
    tok = e.tokenizer
    examples = [Example(("word " * n).strip(), t) for n, t in ((3, "one"), (30, "two words"), (9, "3"),
                                                                (22, "four and more"))]
    enc = encode_examples(tok, examples, 256)
    idx = [0, 1, 2, 3]
    adapters.activate(e.model, [adapters.BASE, adapters.PERSONAL], trainable=adapters.PERSONAL)
    params = adapters.trainable_parameters(e.model, adapters.PERSONAL)
    for p in params:  # a personal adapter that is not zero, so every gradient is
        with torch.no_grad():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype))
    try:
        e.model.eval()  # no dropout: the two runs draw nothing
        runs = []
        for limit in (0, max_tokens):
            e.model.zero_grad(set_to_none=True)
            loss, useful, answered = batch_backward(e.model, enc, idx, tok.pad_token_id, "cpu", max_tokens=limit)
            runs.append((loss, useful, answered, [p.grad.float().clone() for p in params]))
        (whole, u0, a0, g0), (split, u1, a1, g1) = runs
        assert (u0, a0) == (u1, a1) == (sum(len(x.input_ids) for x in enc),
                                        sum(len(x.input_ids) - x.n_prompt for x in enc))
        # Only the padding differs, hence the matmul shapes and summation order: measured 6e-6 of
        # the largest gradient in fp32 and 4e-3 in bf16 (eps 1.2e-7 and 7.8e-3).
        rel = max(1e-4, torch.finfo(e.base.dtype).eps)
        assert abs(whole - split) <= rel * abs(whole)
        for a, b in zip(g0, g1):
            assert torch.allclose(a, b, atol=rel * a.abs().max().item(), rtol=0)
    finally:
        e.model.zero_grad(set_to_none=True)
        adapters.activate(e.model, [adapters.BASE])
        e.reset_personal()
