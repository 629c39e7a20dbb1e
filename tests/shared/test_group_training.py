"""Multi-user training: K users' personal adapters in one pass equal each trained alone, and
no user's loss reaches another user's tensors."""

import pytest
import torch

from shared.config import AdapterSpec, BaseModelSpec, TrainSpec
from shared.engine import Engine
from shared.group_training import GroupLoRA, group_backward
from shared.training import Example, encode_examples

USERS = [
    [Example(f"Rate this review: the strings number {i} sound bright", str(1 + i % 5)) for i in range(10)],
    [Example(f"Tag this movie: a space opera with {i} ships", "sci-fi") for i in range(7)],
    [Example(f"Title this: how I fixed bug {i} in the parser over a long weekend", f"Bug {i}") for i in range(13)],
]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def engine(request, tiny_model_dir):
    # Dropout off: with it, a user's masks in a group come from a shared stream (see the module).
    no_dropout = AdapterSpec(dropout=0.0)
    return Engine(BaseModelSpec(path=str(tiny_model_dir), quantization="none", dtype=request.param),
                  no_dropout, no_dropout)


def _relative_gap(a, b, init):
    """|a - b| / |a - init| over all tensors: how far apart two trainings ended, against how far
    training moved. Element-wise maxima mislead under AdamW: a coordinate whose gradient is
    rounding noise still moves by about lr per step, in either direction."""
    gap = sum(float((a[k] - b[k]).float().norm() ** 2) for k in a) ** 0.5
    moved = sum(float((a[k] - init[k]).float().norm() ** 2) for k in a) ** 0.5
    assert moved > 0
    return gap / moved


def _alone(engine, examples, spec):
    engine.train_personal(examples, spec, progress=False)
    return {k: v.detach().clone() for k, v in engine.personal_state().items()}


def test_each_users_adapter_equals_the_one_trained_alone(engine):
    # Users of different sizes: the 7-item user drops out of the group before the others finish.
    spec = TrainSpec(epochs=2, lr=1e-3, batch_size=4, seed=5, max_grad_norm=1.0)
    alone = [_alone(engine, ex, spec) for ex in USERS]
    results, together = engine.train_personal_group(USERS, spec, progress=False)
    assert [r.steps for r in results] == [6, 4, 8]
    # Measured on the tiny model: fp32 <= 1e-6; bf16 <= 0.03 (a row's bf16 attention rounds
    # differently in a wider padded batch). A loss normalised over the whole group instead of
    # per user ends 0.13 away (AdamW hides most of a gradient's scale; the gradient test below
    # sees it directly).
    tol = 1e-4 if engine.base.model.dtype == torch.float32 else 0.06
    for user, (a, g) in enumerate(zip(alone, together)):
        assert set(a) == set(g)
        gap = _relative_gap(a, g, engine._personal_init)
        assert gap <= tol, f"user {user}: group adapter differs from the alone one by {gap:.3g} of its update"
    # The engine's own slot is left fresh, ready for the next single user.
    assert all(torch.equal(v, engine._personal_init[k]) for k, v in engine.personal_state().items())


def test_each_users_gradient_in_a_group_step_is_its_own_batchs(engine):
    """One group step gives each user the gradient of the mean loss over its own answer tokens,
    exactly what its own batch gives alone (shared.training.batch_backward)."""
    from shared import adapters
    from shared.adapters import BASE, PERSONAL
    from shared.training import batch_backward

    tok = engine.tokenizer
    gen = torch.Generator().manual_seed(0)
    init = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in engine._personal_init.items()}
    batches = [USERS[0][:4], USERS[1][:3], USERS[2][:4]]
    alone = []
    for rows in batches:
        engine.set_personal_state(init)
        engine.resume_personal_training()
        engine.model.zero_grad(set_to_none=True)
        encoded = encode_examples(tok, rows, 256)
        batch_backward(engine.model, encoded, list(range(len(rows))), tok.pad_token_id, "cpu")
        alone.append({k: p.grad.clone() for k, p in engine.model.named_parameters() if f".{PERSONAL}." in k})
    engine.reset_personal()
    adapters.activate(engine.model, [BASE])
    encoded = encode_examples(tok, [e for rows in batches for e in rows], 256)
    owner = [u for u, rows in enumerate(batches) for _ in rows]
    answers = {u: sum(len(e.input_ids) - e.n_prompt for e, o in zip(encoded, owner) if o == u) for u in range(3)}
    group = GroupLoRA(engine.model, PERSONAL, init, 3)
    engine.model.train()
    with group:
        group_backward(engine.model, group, encoded, owner, list(range(len(owner))), answers, tok.pad_token_id, "cpu")
    engine.model.eval()
    tol = 1e-4 if engine.base.model.dtype == torch.float32 else 3e-2
    for u in range(3):
        for layer in group.layers:
            name = layer.a_key.replace(".lora_A.weight", f".lora_A.{PERSONAL}.weight")
            for key, pname in ((layer.a_key, name), (layer.b_key, name.replace("lora_A", "lora_B"))):
                mine, ref = group.users[u][key].grad, alone[u][pname]
                gap = float((mine - ref).norm() / ref.norm())
                assert gap <= tol, f"user {u} {key}: gradient differs from its own batch's by {gap:.3g}"


def test_no_users_loss_reaches_another_users_tensors(engine):
    from shared import adapters
    from shared.adapters import BASE, PERSONAL

    tok = engine.tokenizer
    encoded = encode_examples(tok, USERS[0][:2] + USERS[1][:2] + USERS[2][:2], 256)
    owner = [0, 0, 1, 1, 2, 2]
    init = {k: v + 0.01 * torch.randn_like(v) for k, v in engine._personal_init.items()}  # B != 0: A gets gradients
    adapters.activate(engine.model, [BASE])
    group = GroupLoRA(engine.model, PERSONAL, init, 3)
    engine.model.train()
    with group:
        # Only user 1's answer tokens count: users 0 and 2 ride along in the same batch.
        group_backward(engine.model, group, encoded, owner, list(range(6)), {1: 5}, tok.pad_token_id, "cpu")
    engine.model.eval()
    grads = [[p.grad for p in group.parameters(u)] for u in range(3)]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads[1])
    for u in (0, 2):
        assert all(g is None or bool((g == 0).all()) for g in grads[u]), f"user {u} received user 1's gradient"


def test_group_selection_decides_as_each_user_alone(engine):
    """train_and_select_group: the same validation split, base score, checkpoint scores and
    decision per user as train_and_select gives that user alone; a user with too little
    history is decided without training and does not hold the others back."""
    from shared.config import SelectionSpec
    from shared.selection import train_and_select, train_and_select_group
    from shared.tasks import get_task

    task = get_task("synthetic-tag")
    users = [[Example(f"Tag: film {u}-{i}", "comedy" if (i + u) % 2 else "action") for i in range(n)]
             for u, n in enumerate((9, 3, 12))]
    train = TrainSpec(epochs=2, lr=5e-3, batch_size=4, seed=1)
    select = SelectionSpec(checks=2, min_train=4)
    alone = []
    for ex in users:
        result, sel = train_and_select(engine, task, ex, train, select, progress=False)
        alone.append((result, sel, engine.personal_state() if sel.adopted else None))
    grouped = train_and_select_group(engine, task, users, train, select, progress=False)
    tol = 1e-4 if engine.base.model.dtype == torch.float32 else 0.02
    assert "too little history" in grouped[1][1].reason and grouped[1][0].steps == 0
    for (ra, sa, _), (rg, sg, _) in zip(alone, grouped):
        assert (sa.adopted, sa.train_items, sa.validation_items, ra.steps) == \
            (sg.adopted, sg.train_items, sg.validation_items, rg.steps)
        assert [c["step"] for c in sa.checks] == [c["step"] for c in sg.checks]
        for ca, cg in zip(sa.checks, sg.checks):
            assert abs(ca["loss"] - cg["loss"]) <= tol * max(1.0, abs(ca["loss"]))
    assert len(grouped[2][1].checks) == 2 and len(grouped[0][1].checks) == 2
