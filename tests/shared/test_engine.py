"""The engine (shared/engine.py): one base model, the shared base adapter and one personal slot,
moved between users in place. What a caller relies on: the base adapter saves and loads back
exactly, an empty personal slot answers as the base adapter alone, and a user's personal state
never reaches the base adapter or another user.

The tiny random model stands in for the real one (same code paths); tests/shared/test_adapters.py
covers the personal adapter's files, test_training.py the training loop."""

import json

import pytest
import torch

from shared.adapters import ADAPTER_MANIFEST, AdapterManifest
from shared.config import TrainSpec
from shared.training import Example

EXAMPLES = [Example(f"Which tag? movie number {i}", "comedy") for i in range(4)]
PROBE = [Example(f"Which tag? a film about {w}", "drama") for w in ("storms", "violins", "ledgers")]
QUICK = TrainSpec(epochs=2, lr=5e-2, batch_size=2, seed=1)  # four steps


def _random(state, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * scale).to(v.dtype) for k, v in state.items()}


def _copy(state):
    return {k: v.detach().clone() for k, v in state.items()}


def _equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def engine(tiny_engine):
    """The session's tiny engine, given back with its base adapter and personal slot as found."""
    base = _copy(tiny_engine.base_state())
    yield tiny_engine
    tiny_engine.set_base_state(base)
    tiny_engine.reset_personal()


def test_base_adapter_saves_and_loads_back_exactly(engine, tmp_path):
    engine.set_base_state(_random(engine.base_state(), 1))
    saved = _copy(engine.base_state())
    manifest = AdapterManifest(role="base", base_model_hash=engine.model_hash, task="synthetic-tag",
                               peft_type="lora", train={"round": 3})
    target = engine.save_base(tmp_path / "base", manifest)
    assert json.loads((target / ADAPTER_MANIFEST).read_text())["train"] == {"round": 3}

    engine.set_base_state(_random(engine.base_state(), 2))
    assert not _equal(engine.base_state(), saved)
    loaded = engine.load_base(target)
    assert _equal(engine.base_state(), saved)
    assert (loaded.role, loaded.base_model_hash, loaded.train) == ("base", engine.model_hash, {"round": 3})


def test_base_adapter_of_another_model_is_refused_and_nothing_changes(engine, tmp_path):
    target = engine.save_base(tmp_path / "base", AdapterManifest(role="base", base_model_hash=engine.model_hash,
                                                                 task="synthetic-tag", peft_type="lora"))
    m = json.loads((target / ADAPTER_MANIFEST).read_text())
    (target / ADAPTER_MANIFEST).write_text(json.dumps(m | {"base_model_hash": "0" * 64}))
    engine.set_base_state(_random(engine.base_state(), 3))
    before = _copy(engine.base_state())
    with pytest.raises(ValueError, match="trained on base model 000000000000"):
        engine.load_base(target)
    assert _equal(engine.base_state(), before)


def test_a_base_state_that_does_not_fit_is_refused_and_nothing_changes(engine):
    engine.set_base_state(_random(engine.base_state(), 4))
    before = _copy(engine.base_state())
    key = next(iter(before))
    with pytest.raises(ValueError, match="holds NaN or inf"):
        engine.set_base_state(before | {key: torch.full_like(before[key], float("nan"))})
    with pytest.raises(ValueError, match=f"{key} has shape"):
        engine.set_base_state(before | {key: before[key][:1]})
    with pytest.raises(ValueError, match="missing"):
        engine.set_base_state({k: v for k, v in before.items() if k != key})
    assert _equal(engine.base_state(), before)


def test_reset_personal_answers_as_the_base_adapter_again(engine):
    engine.set_base_state(_random(engine.base_state(), 5))
    engine.reset_personal()
    prompts = [e.prompt for e in PROBE]
    fresh = engine.answer(prompts, max_new_tokens=4, personal=True)
    base_only = engine.example_losses(PROBE, personal=False)
    engine.train_personal(EXAMPLES, QUICK, progress=False)
    assert engine.example_losses(PROBE, personal=True) != base_only  # the trained slot does answer
    engine.reset_personal()
    assert engine.personal_loaded is None
    # LoRA's initial B is zero: base + empty personal computes base + 0, the very same numbers.
    assert engine.example_losses(PROBE, personal=True) == base_only
    # (Answers go through one stacked slot whose scale is folded in, which may round differently
    # from the base slot alone in bf16 (shared.adapters.stacked_as_one): compared with the fresh slot's.)
    assert engine.answer(prompts, max_new_tokens=4, personal=True) == fresh


def test_personal_training_leaves_the_base_adapter_alone(engine):
    engine.set_base_state(_random(engine.base_state(), 6))
    base = _copy(engine.base_state())
    base_losses = engine.example_losses(PROBE, personal=False)
    engine.train_personal(EXAMPLES, QUICK, progress=False)
    assert _equal(engine.base_state(), base)
    assert engine.example_losses(PROBE, personal=False) == base_losses


def test_personal_state_is_copied_in_and_one_users_state_does_not_reach_the_next(engine):
    engine.train_personal(EXAMPLES, QUICK, progress=False)
    user_a = _copy(engine.personal_state())
    given = _copy(user_a)
    engine.set_personal_state(given, label="user-a")
    for v in given.values():  # the caller's tensors are theirs: the slot holds a copy
        v.add_(1.0)
    assert _equal(engine.personal_state(), user_a) and engine.personal_loaded == "user-a"
    losses_a = engine.example_losses(PROBE, personal=True)

    engine.reset_personal()  # the next user starts from the initial weights, not from user A's
    assert _equal(engine.personal_state(), engine._personal_init)
    user_b = _random(engine.personal_state(), 7)
    engine.set_personal_state(user_b)
    assert engine.example_losses(PROBE, personal=True) != losses_a
    engine.set_personal_state(user_a)  # and user A comes back exactly
    assert engine.example_losses(PROBE, personal=True) == losses_a


def test_a_personal_state_that_does_not_fit_is_refused_and_nothing_changes(engine):
    engine.set_personal_state(_random(engine.personal_state(), 8))
    before = _copy(engine.personal_state())
    key = next(iter(before))
    with pytest.raises(ValueError, match="holds NaN or inf"):
        engine.set_personal_state(before | {key: torch.full_like(before[key], float("inf"))})
    with pytest.raises(ValueError, match="unknown"):
        engine.set_personal_state(before | {"somewhere.else.weight": before[key]})
    assert _equal(engine.personal_state(), before)


def test_train_base_freezes_lora_a_for_ffa_and_pulls_toward_the_start_for_fedprox(engine):
    engine.set_base_state(_random(engine.base_state(), 9))
    start = _copy(engine.base_state())
    engine.train_base(EXAMPLES, QUICK, freeze_lora_a=True, progress=False)
    after = engine.base_state()
    a_keys = [k for k in start if ".lora_A." in k]
    b_keys = [k for k in start if ".lora_B." in k]
    assert a_keys and b_keys
    assert all(torch.equal(after[k], start[k]) for k in a_keys)  # FFA-LoRA: A stays the shared init
    assert any(not torch.equal(after[k], start[k]) for k in b_keys)

    def moved(**kw):
        engine.set_base_state(start)
        engine.train_base(EXAMPLES, QUICK, progress=False, **kw)
        return sum(float((engine.base_state()[k].float() - start[k].float()).norm()) for k in start)

    # FedProx's mu * (w - w_start) in every gradient keeps the local update closer to the start.
    assert moved(proximal_mu=50.0) < moved()
    assert all(p.grad is None or not p.requires_grad for p in engine.model.parameters())  # hooks gone
