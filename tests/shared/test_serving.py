"""Many users in one mixed batch: each row must be answered exactly as that user alone would be."""

import pytest
import torch

from shared import adapters


def _random_state(engine, name, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in adapters.get_state(engine.model, name).items()}


@pytest.fixture()
def served(tiny_engine):
    e = tiny_engine
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


def test_mixed_batch_logits_equal_each_users_own(served):
    e, users = served
    ids = torch.tensor([e.tokenizer("the strings sound bright and warm")["input_ids"]] * 4)
    names = list(users) + [None]
    e.model.eval()
    mixed = _logits(e.model, ids, adapter_names=[e._served[u] if u else adapters.BASE for u in names][:4])
    for row, user in enumerate(names[:4]):
        if user is None:
            adapters.activate(e.model, [adapters.BASE])
        else:
            e.set_personal_state(users[user])
            adapters.activate(e.model, [adapters.BASE, adapters.PERSONAL])
        alone = _logits(e.model, ids[row : row + 1])
        assert torch.allclose(mixed[row], alone[0], atol=1e-4), user
    adapters.activate(e.model, [adapters.BASE])
    # The personal adapters really differ, so equality above is not vacuous.
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)


def test_answer_users_matches_one_user_path(served):
    e, users = served
    prompts = [f"Rate this review: strings number {i}" for i in range(5)]
    who = ["user0", "user1", None, "user2", "user0"]
    mixed = e.answer_users(prompts, who, max_new_tokens=3)
    for p, u, got in zip(prompts, who, mixed):
        if u is not None:
            e.set_personal_state(users[u])
        assert e.answer([p], max_new_tokens=3, personal=u is not None) == [got]


def test_base_change_drops_served_users(served):
    e, users = served
    e.set_base_state(e.base_state())
    with pytest.raises(KeyError, match="serve_user"):
        e.answer_users(["hi"], ["user0"], max_new_tokens=1)
