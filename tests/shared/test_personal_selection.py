"""Per-user validation and adoption of personal adapters (shared.selection): the rule on a
scripted engine, and on the real model that planted preferences are adopted while histories
without a personal signal are rejected."""

from __future__ import annotations

import random

import pytest

from shared.config import SelectionSpec, TrainSpec
from shared.records import HistoryItem, UserData
from shared.selection import Selection, ValScore, beats, cross_fitted_gain, train_and_select, validation_size
from shared.tasks import get_task
from shared.training import Example, TrainResult

from planted_preferences import plain_history_examples, planted_user


def test_validation_size_holds_out_the_most_recent_fifth_at_least_two():
    spec = SelectionSpec()
    assert [validation_size(n, spec) for n in (4, 10, 11, 40)] == [2, 2, 3, 8]
    assert validation_size(40, SelectionSpec(enabled=False)) == 0


def test_adoption_needs_a_better_metric_at_a_lower_loss():
    base = ValScore(loss=2.0, metric=0.5)
    assert beats(ValScore(1.9, 0.75), base, "accuracy")
    assert not beats(ValScore(1.2, 0.5), base, "accuracy")  # a tie keeps the base, however low the loss
    assert not beats(ValScore(1.9, 0.25), base, "accuracy")  # better loss, worse answers
    assert not beats(ValScore(2.1, 1.0), base, "accuracy")  # better answers by luck, worse loss
    assert beats(ValScore(1.9, 0.4), ValScore(2.0, 0.5), "mae")  # lower MAE is better
    assert not beats(ValScore(1.9, 0.5), ValScore(2.0, 0.5), "mae")
    assert not beats(ValScore(1.9, 0.6), ValScore(2.0, 0.5), "mae")


def _scored(metric: str, base: tuple[list[float], list[float]], *checks: tuple[list[float], list[float]]) -> Selection:
    """A selection record from per-item (metrics, losses) of base and of each checkpoint."""
    def vs(m, l):
        return ValScore(loss=sum(l) / len(l), metric=sum(m) / len(m), item_losses=tuple(l), item_metrics=tuple(m))

    b = vs(*base)
    return Selection(adopted=False, reason="", metric=metric, train_items=8, validation_items=len(base[0]), base=b,
                     checks=[{"step": i + 1, "loss": vs(*c).loss, "metric": vs(*c).metric, "item_metrics": c[0],
                              "item_losses": c[1]} for i, c in enumerate(checks)])


def test_cross_fitted_gain_scores_the_rule_on_the_item_it_did_not_choose_on():
    # Right on one item by luck (and wrong on the other as base was): selection on both items adopts
    # it for +0.5, but chosen on either item alone it gains nothing on the other.
    lucky = _scored("accuracy", ([0, 0], [1.0, 1.0]), ([1, 0], [0.8, 1.1]))
    assert beats(ValScore(0.95, 0.5), lucky.base, "accuracy")  # what selection itself would do
    assert cross_fitted_gain(lucky) == 0.0
    # Better on every item: the gain carries to the item left out.
    assert cross_fitted_gain(_scored("accuracy", ([0, 0], [1.0, 1.0]), ([1, 1], [0.5, 0.5]))) == 1.0
    # Chosen on the item it got right, it answers the other one wrong: a loss selection never shows.
    assert cross_fitted_gain(_scored("accuracy", ([0, 1], [1.0, 1.0]), ([1, 0], [0.5, 0.9]))) == -0.5
    # Lower is better for MAE: an error of 1 turned into 0 on both items is a gain of +1.
    assert cross_fitted_gain(_scored("mae", ([1, 1], [1.0, 1.0]), ([0, 0], [0.5, 0.5]), ([2, 2], [0.4, 0.4]))) == 1.0
    # The best of several checkpoints on the other items is the one scored.
    assert cross_fitted_gain(_scored("accuracy", ([0, 0, 0], [1.0] * 3), ([1, 1, 0], [0.9] * 3),
                                     ([1, 1, 1], [0.8] * 3))) == 1.0
    # Nothing trained: base kept, no gain; one validation item or no per-item scores: no estimate.
    assert cross_fitted_gain(_scored("accuracy", ([0, 1], [1.0, 1.0]))) == 0.0
    assert cross_fitted_gain(_scored("accuracy", ([0], [1.0]), ([1], [0.5]))) is None
    old = _scored("accuracy", ([0, 0], [1.0, 1.0]), ([1, 1], [0.5, 0.5]))
    del old.checks[0]["item_metrics"]
    assert cross_fitted_gain(old) is None


class ScriptedEngine:
    """An engine whose validation scores follow a script: the base's, then one per checkpoint.
    Validation prompts are "q<i>"; item j of the n held out is answered right when
    j < metric * n."""

    def __init__(self, base: ValScore, checks: list[ValScore], n_examples: int = 10, n_val: int = 2) -> None:
        import threading

        self.lock = threading.RLock()
        self.script = [base] + checks
        self.current = base
        self.first_val, self.n_val = n_examples - n_val, n_val
        self.state = {"w": 0.0}
        self.resets = 0
        self.trained_on: list[Example] = []

    def example_losses(self, examples, *, personal, max_length):
        return [self.current.loss] * len(examples)

    def answer_tokens(self, task, history):
        return task.max_new_tokens

    def validation_pass(self, examples, *, personal, max_length, max_new_tokens, task):
        return (self.example_losses(examples, personal=personal, max_length=max_length),
                self.answer([e.prompt for e in examples], max_new_tokens=max_new_tokens, personal=personal))

    def answer(self, prompts, *, max_new_tokens, personal, task=None):
        right = round(self.current.metric * self.n_val)
        return ["comedy" if int(p[1:]) - self.first_val < right else "classic" for p in prompts]

    def train_personal(self, examples, spec, *, fresh, checkpoints, on_checkpoint, **kw):
        self.trained_on, self.checkpoints_asked = list(examples), checkpoints
        for step in range(1, len(self.script)):
            self.state, self.current = {"w": float(step)}, self.script[step]
            on_checkpoint(step, len(self.script) - 1)
        return TrainResult(len(self.script) - 1, len(examples), spec.epochs, 0, 0, losses=[1.0])

    def resume_personal_training(self):
        pass

    def personal_state(self):
        import torch

        return {"w": torch.tensor(self.state["w"])}

    def set_personal_state(self, state, label=None):
        self.state = {"w": float(state["w"])}

    def reset_personal(self):
        self.resets += 1
        self.state = {"w": 0.0}

    model = type("M", (), {"eval": lambda self: None})()


def _examples(n: int) -> list[Example]:
    return [Example(f"q{i}", "comedy") for i in range(n)]


def test_best_checkpoint_that_beats_base_is_kept_and_the_rest_is_never_trained_on():
    task = get_task("synthetic-tag")
    base = ValScore(2.0, 0.5)
    engine = ScriptedEngine(base, [ValScore(1.8, 1.0), ValScore(1.5, 1.0), ValScore(1.2, 0.5), ValScore(2.5, 1.0)])
    result, sel = train_and_select(engine, task, _examples(10), TrainSpec(), SelectionSpec(checks=4))
    assert sel.adopted and sel.best_step == 2 and sel.best.metric == 1.0
    assert engine.state == {"w": 2.0}  # the slot holds the chosen checkpoint, not the last one
    assert [e.prompt for e in engine.trained_on] == [f"q{i}" for i in range(8)]  # the last 2 validate
    assert (sel.train_items, sel.validation_items) == (8, 2) and len(sel.checks) == 4


def test_no_checkpoint_beating_base_is_not_adopted_and_the_slot_is_reset():
    task = get_task("synthetic-tag")
    # a tie at a lower loss, then a better metric at a higher loss
    engine = ScriptedEngine(ValScore(2.0, 0.5), [ValScore(1.5, 0.5), ValScore(2.2, 1.0)])
    result, sel = train_and_select(engine, task, _examples(10), TrainSpec(), SelectionSpec(checks=2))
    assert not sel.adopted and sel.best is None and engine.state == {"w": 0.0} and engine.resets == 1
    assert "no checkpoint beat" in sel.reason


def test_a_base_that_is_already_perfect_on_validation_trains_nothing():
    """Adoption needs a better metric; none beats a perfect one, so training would be wasted."""
    task = get_task("synthetic-tag")
    engine = ScriptedEngine(ValScore(2.0, 1.0), [ValScore(0.5, 1.0)])
    result, sel = train_and_select(engine, task, _examples(10), TrainSpec(), SelectionSpec())
    assert not sel.adopted and result.steps == 0 and engine.trained_on == [] and engine.resets == 1
    assert "already scores the best accuracy" in sel.reason and sel.base.metric == 1.0


def test_adopt_last_keeps_the_last_checkpoint_whatever_validation_says():
    task = get_task("synthetic-tag")
    # Worse than base at the end, and base already perfect: "better" would train nothing.
    engine = ScriptedEngine(ValScore(2.0, 1.0), [ValScore(1.5, 1.0), ValScore(2.5, 0.5)])
    result, sel = train_and_select(engine, task, _examples(10), TrainSpec(), SelectionSpec(checks=2, adopt="last"))
    assert sel.adopted and sel.rule == "last" and sel.best_step == 2 and sel.best.metric == 0.5
    assert engine.state == {"w": 2.0} and "last checkpoint" in sel.reason
    assert "last checkpoint, always adopted (step 2/2)" in sel.summary()  # the log line says which rule
    assert len(sel.checks) == 2 and sel.base.metric == 1.0  # validation still scored and recorded
    # Only the last checkpoint decides anything, so the engine is asked to stop at that one alone
    # (each earlier one would cost a scoring pass for nothing).
    assert engine.checkpoints_asked == 1
    # Its honest gain is the last checkpoint's own: nothing was chosen on validation.
    assert cross_fitted_gain(sel) == -0.5
    with pytest.raises(ValueError, match="allowed values are better, last"):
        SelectionSpec(adopt="best")


def test_too_little_history_trains_nothing():
    task = get_task("synthetic-tag")
    engine = ScriptedEngine(ValScore(2.0, 1.0), [], n_examples=5)
    result, sel = train_and_select(engine, task, _examples(5), TrainSpec(), SelectionSpec(min_train=4))
    assert not sel.adopted and result.steps == 0 and engine.trained_on == [] and "too little history" in sel.reason


def test_one_user_at_a_time_returns_the_adopted_state_not_the_reset_slot(tiny_engine, monkeypatch):
    """train_and_select_users resets the personal slot after each user: the state it hands back
    for an adopted user must be that user's adapter, not a view of the slot the reset wiped (the
    harness answers and saves with it; a view made every adopted adapter answer as the fresh one)."""
    import torch

    import shared.selection as selection

    engine = tiny_engine
    g = torch.Generator().manual_seed(3)
    trained = {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in engine.personal_state().items()}

    def fake_train_and_select(engine, task, examples, train, spec, **kw):
        engine.set_personal_state(trained, label="trained")
        return TrainResult(1, len(examples), 1, 0, 0), selection.Selection(
            adopted=True, reason="scripted", metric="accuracy", train_items=len(examples), validation_items=0)

    monkeypatch.setattr(selection, "train_and_select", fake_train_and_select)
    task = get_task("synthetic-tag")
    out = selection.train_and_select_users(engine, task, [_examples(4)], TrainSpec(users_per_pass=1), SelectionSpec())
    (_, sel, state), = out
    assert sel.adopted and state is not None
    for k, v in trained.items():
        assert torch.equal(state[k], v), k
    assert any(not torch.equal(engine.personal_state()[k], v) for k, v in trained.items())  # the slot was reset


def _without_signal(user: UserData, population: list[UserData], seed: int) -> UserData:
    """The same items with tags drawn from the whole population's tags (the base users'): a user
    indistinguishable from everyone else, so nothing personal to learn beyond the base adapter."""
    pool = [it.fields["tag"] for u in population for it in u.history]
    rng = random.Random(seed)
    history = [HistoryItem(it.id, {**it.fields, "tag": rng.choice(pool)}, it.time) for it in user.history]
    return UserData(user.user_id + "-nosignal", history, user.queries)


# Slow (make test-all): a base adapter trained to fit the population, then three selections.
@pytest.mark.slow
@pytest.mark.realmodel
def test_planted_preferences_are_adopted_and_histories_without_signal_are_not(real_engine):
    # A base adapter that has learned the task itself, so what a personal adapter adds is personal.
    # (Seed 3: the base users' most common tag, action, is not this user's favourite, sci-fi.)
    planted = planted_user(real_engine, seed=3, base_examples=120, base_train=TrainSpec(epochs=2, lr=1e-3, batch_size=8))
    task, baseline = planted.task, planted.baseline
    train = TrainSpec(epochs=2, lr=1e-3, batch_size=4)

    def select(user):
        return train_and_select(real_engine, task, plain_history_examples(task, user), train, SelectionSpec(),
                                progress=False)[1]

    sel = select(planted.user)
    assert sel.adopted, sel.summary()
    personal = planted.accuracy(real_engine, personal=True)
    assert personal > baseline and personal >= 0.5, (personal, baseline)

    without = [select(_without_signal(planted.user, planted.dataset.base_users, seed)) for seed in (0, 1)]
    assert not any(s.adopted for s in without), [(s.summary(), s.checks) for s in without]
