"""Many users in one mixed batch: each row must be answered exactly as that user alone would be,
in every compute dtype (fp32 on CPUs without bf16, bf16 on AMX / AVX512-BF16 CPUs and CUDA)."""

import pytest
import torch

from shared import adapters


def _random_state(engine, name, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in adapters.get_state(engine.model, name).items()}


@pytest.fixture()
def served(dtype_engine):
    e = dtype_engine
    base_before = {k: v.clone() for k, v in e.base_state().items()}
    e.set_base_state(_random_state(e, adapters.BASE, 1))
    users = {f"user{i}": _random_state(e, adapters.PERSONAL, 10 + i) for i in range(3)}
    for u, state in users.items():
        e.serve_user(u, state)
    yield e, users
    e.drop_served()
    e.set_base_state(base_before)
    e.reset_personal()


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits


def _one_user_logits(e, ids, personal, monkeypatch):
    """The logits of `ids` as Engine.answer computes them for one user: its own forward, taken
    where it would start generating (same adapters, same per-row slots)."""
    import shared.engine

    seen = []

    def forward_instead(model, tokenizer, prompts, adapter_names=None, **kw):
        # the batch is `ids`, every row this user's: batching alone may round a row differently
        seen.append(_logits(model, ids, **({"adapter_names": [adapter_names[0]] * len(ids)} if adapter_names else {})))
        return [""] * len(prompts)

    monkeypatch.setattr(shared.engine, "generate", forward_instead)
    e.answer(["(not generated)"], max_new_tokens=1, personal=personal)
    monkeypatch.undo()
    return seen[0]


def test_mixed_batch_logits_equal_each_users_own(served, monkeypatch):
    e, users = served
    ids = torch.tensor([e.tokenizer("the strings sound bright and warm")["input_ids"]] * 4)
    names = list(users) + [None]
    e.model.eval()
    mixed = _logits(e.model, ids, adapter_names=[e._served[u] if u else adapters.BASE for u in names])
    assert mixed.dtype == e.base.dtype
    for row, user in enumerate(names):
        if user is not None:
            e.set_personal_state(users[user])
        # What the one-user path (Engine.answer) computes for this user: the same operations on a
        # batch of the same size. PEFT still runs each user's LoRA on that user's rows only, and a
        # CPU's matmul may round a 1-row product differently from a 4-row one (measured on AVX2 in
        # fp32: 2.4e-7, one rounding), so: equal up to a rounding or two of the compute dtype.
        alone = _one_user_logits(e, ids, user is not None, monkeypatch)
        one = 4 * torch.finfo(e.base.dtype).eps * alone[row].abs().max().item()
        torch.testing.assert_close(mixed[row], alone[row], atol=one, rtol=0, msg=lambda m: f"{user}: {m}")
        # ... and that is base + personal: the two adapters applied one after the other agree up to
        # a few roundings of the compute dtype (eps: 1.2e-7 in fp32, 7.8e-3 in bf16).
        adapters.activate(e.model, [adapters.BASE] if user is None else [adapters.BASE, adapters.PERSONAL])
        apart = _logits(e.model, ids[row : row + 1])[0]
        tol = 8 * torch.finfo(e.base.dtype).eps * apart.abs().max().item()
        torch.testing.assert_close(mixed[row], apart, atol=tol, rtol=0)
        adapters.activate(e.model, [adapters.BASE])
    # The personal adapters really differ, so equality above is not vacuous.
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-2)


def test_answer_users_matches_one_user_path(served):
    """Each user's answers in a mixed batch are the one-user path's (Engine.answer) on the same
    batch. Same batch, because in bf16 a CPU's matmul may round a row differently when the batch
    has another number of rows: batching alone can change an answer there, mixing users must not."""
    e, users = served
    prompts = [f"Rate this review: strings number {i}" + " and more" * (i % 3) for i in range(8)]
    who = ["user0", "user1", None, "user2", "user0", None, "user1", "user2"]
    mixed = e.answer_users(prompts, who, max_new_tokens=4, batch_size=8)
    for u in set(who):
        if u is not None:
            e.set_personal_state(users[u])
        alone = e.answer(prompts, max_new_tokens=4, personal=u is not None, batch_size=8)
        assert [a for a, w in zip(alone, who) if w == u] == [a for a, w in zip(mixed, who) if w == u], u


def test_base_change_drops_served_users(served):
    e, users = served
    e.set_base_state(e.base_state())
    with pytest.raises(KeyError, match="serve_user"):
        e.answer_users(["hi"], ["user0"], max_new_tokens=1)
