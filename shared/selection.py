"""Per-user validation and model selection: a personal adapter is adopted only when it makes the
model better for its user on that user's own most recent history.

Why: on a small model and a few dozen history items a personal adapter can as easily hurt as
help (repetition, copying an earlier target, a collapsed score), and nothing at query time would
notice. So every caller that trains a personal adapter (experiment harness, federation client,
daemon) goes through `train_and_select`:

1. The user's most recent items (SelectionSpec.validation_fraction, at least min_validation) are
   held out of training; training example i still retrieves only from items before i.
2. Base + base adapter is scored on them once (answer loss and the task's primary metric).
3. The adapter is scored at evenly spaced checkpoints during training; the best checkpoint that
   *beats base* (a better task metric at a lower mean loss; a tie keeps the base) is kept.
4. If no checkpoint beats base, the adapter is not adopted: the slot is reset and the caller
   answers as the method's non-personal counterpart. The decision and every score are recorded.

SelectionSpec.adopt = "last" keeps steps 1-3 but always adopts the last checkpoint: the paper's
always-adopt policy on the same training items, with its validation scores recorded, so a sweep
can set it against selection on equal terms (cross_fitted_gain).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

from .config import SelectionSpec, TrainSpec
from .metrics import METRIC_BEST, METRIC_DIRECTION
from .quant4bit import dense_4bit_weights
from .training import Example, TrainResult


@dataclass(frozen=True)
class ValScore:
    """Validation score of one model state: mean answer-token loss and the task's primary metric."""

    loss: float
    metric: float
    item_losses: tuple[float, ...] = ()  # per validation item, same order for every state scored
    item_metrics: tuple[float, ...] = ()  # the primary metric of each item alone (a mean over items)


@dataclass
class Selection:
    """What was decided for one user's personal adapter, and why (written to the run directory)."""

    adopted: bool
    reason: str
    metric: str  # the task's primary metric (direction: shared.metrics.METRIC_DIRECTION)
    train_items: int
    validation_items: int
    base: ValScore | None = None
    best: ValScore | None = None
    best_step: int = 0
    total_steps: int = 0
    checks: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss", "metric", "items_improved", ...}
    rule: str = "better"  # SelectionSpec.adopt: "better" (beats base) or "last" (always the last checkpoint)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def verdict(self, kept: str | None = None) -> str:
        """The decision in words for a person, on the validation numbers it was made on:
        "kept v000002: validation mae 0.500 vs base 0.750 on 3 held-out items" or
        "not adopted: ...". `kept` names the version the adopted adapter was published as."""
        if self.base is None:  # nothing was validated: too little history, or selection off
            return f"{('kept ' + kept) if kept else 'adopted' if self.adopted else 'not adopted'}: {self.reason}"
        on = f"on {self.validation_items} held-out items"
        if self.adopted and self.best is not None:
            return (f"{('kept ' + kept) if kept else 'adopted'}: validation {self.metric} {self.best.metric:.3f} vs "
                    f"base {self.base.metric:.3f} {on} (answer loss {self.best.loss:.3f} vs {self.base.loss:.3f})")
        sign = 1.0 if METRIC_DIRECTION.get(self.metric, "higher") == "higher" else -1.0
        if not self.checks:
            return f"not adopted: validation {self.metric} of base {self.base.metric:.3f} {on}; {self.reason}"
        top = max(self.checks, key=lambda c: (sign * c["metric"], -c["loss"]))
        return (f"not adopted: validation {self.metric} {top['metric']:.3f} at best vs base {self.base.metric:.3f} "
                f"{on} (answer loss {top['loss']:.3f} vs {self.base.loss:.3f}); {self.reason}")

    def summary(self) -> str:
        """One line for logs and for a person: what was decided on which numbers."""
        if self.base is None:
            return f"{'adopted' if self.adopted else 'not adopted'}: {self.reason}"
        which = "last checkpoint, always adopted" if self.rule == "last" else "best checkpoint"
        best = (f"{which} (step {self.best_step}/{self.total_steps}) loss {self.best.loss:.3f} "
                f"{self.metric} {self.best.metric:.4f}" if self.best else "no checkpoint beat it")
        return (f"{'adopted' if self.adopted else 'not adopted'} on {self.validation_items} validation items: "
                f"base loss {self.base.loss:.3f} {self.metric} {self.base.metric:.4f}; {best}")


def validation_size(n_history: int, spec: SelectionSpec) -> int:
    """How many of the most recent items are held out (0 when selection is off)."""
    if not spec.enabled:
        return 0
    return max(spec.min_validation, math.ceil(n_history * spec.validation_fraction))


def history_needed(spec: SelectionSpec) -> int:
    """The smallest history selection can decide on: min_train items left for training after the
    hold-out (validation_size). Below it no adapter is trained, so nothing should start training
    (the daemon's automatic training waits for it). With selection off: one item."""
    if not spec.enabled:
        return 1
    n = spec.min_train
    while n - validation_size(n, spec) < spec.min_train:  # training items never fall as n grows
        n += 1
    return n


def beats(candidate: ValScore, base: ValScore, metric: str) -> bool:
    """The adoption rule: a better task metric than base, at a lower mean answer loss.

    A tie on the metric keeps the base: the adapter is extra model capacity fitted to a few dozen
    items, and on held-out items it has shown no gain. A falling loss alone is not a gain: an
    adapter trained on a history with no personal signal still lowers the validation loss (it fits
    the task's format and the population's labels a little further; measured on SmolLM2-135M,
    synthetic tags drawn from the population: 1.52 -> 1.35 at equal accuracy) while answering no
    better. The loss condition guards the other way: a metric that improved by luck on a handful
    of items while the adapter's answers became less likely overall.
    """
    sign = 1.0 if METRIC_DIRECTION.get(metric, "higher") == "higher" else -1.0
    return sign * (candidate.metric - base.metric) > 1e-12 and candidate.loss < base.loss


def _better(a: ValScore, b: ValScore, metric: str) -> bool:
    """Among checkpoints that beat base: higher metric first, then lower loss."""
    sign = 1.0 if METRIC_DIRECTION.get(metric, "higher") == "higher" else -1.0
    da = sign * (a.metric - b.metric)
    return da > 1e-12 or (abs(da) <= 1e-12 and a.loss < b.loss)


def cross_fitted_gain(sel: Selection) -> float | None:
    """What the adoption rule gains on items it did not choose on: for each validation item in
    turn, the rule (beats, then _better) picks among the checkpoints on the *other* items, and the
    pick (or base, when none beats it) is scored on the item left out; the mean over items of that
    score minus base's, positive = better. Selection's own best score is chosen on the very items
    it is measured on, so it is optimistic, and more so for a recipe whose checkpoints vary more;
    this estimate is not, which is what a recipe sweep must compare (it judges a rule that sees
    one item fewer). None where nothing was validated or the scores lack per-item values; 0.0
    where nothing was trained (the rule kept base)."""
    base = sel.base
    if base is None or len(base.item_metrics) < 2:
        return None
    if not sel.checks:
        return 0.0
    n = len(base.item_metrics)
    if any(len(c.get("item_metrics", ())) != n or len(c.get("item_losses", ())) != n for c in sel.checks):
        return None
    sign = 1.0 if METRIC_DIRECTION.get(sel.metric, "higher") == "higher" else -1.0
    if sel.rule == "last":  # nothing was chosen on validation: the last checkpoint's gain is already honest
        return sign * (sum(sel.checks[-1]["item_metrics"]) - sum(base.item_metrics)) / n

    def without(metrics: Sequence[float], losses: Sequence[float], j: int) -> ValScore:
        rest = [i for i in range(n) if i != j]
        return ValScore(loss=sum(losses[i] for i in rest) / len(rest), metric=sum(metrics[i] for i in rest) / len(rest))

    gains = []
    for j in range(n):
        base_rest = without(base.item_metrics, base.item_losses, j)
        best, best_j = None, base.item_metrics[j]
        for c in sel.checks:
            rest = without(c["item_metrics"], c["item_losses"], j)
            if beats(rest, base_rest, sel.metric) and (best is None or _better(rest, best, sel.metric)):
                best, best_j = rest, c["item_metrics"][j]
        gains.append(sign * (best_j - base.item_metrics[j]))
    return sum(gains) / n


def score(engine: Any, task: Any, examples: Sequence[Example], *, personal: bool, max_length: int,
          pause: Callable[[], Any] | None = None, chunk: int = 4, max_new_tokens: int | None = None) -> ValScore:
    """Loss and primary metric of base + base adapter (+ the personal slot) on `examples`,
    answered within `max_new_tokens` (default: the task's).

    `pause()` runs between chunks of `chunk` items: a daemon serves the answers waiting
    meanwhile, so a validation checkpoint delays them by one chunk, not the whole set.
    """
    metric = task.metric_names[0]
    losses: list[float] = []
    answers: list[str] = []
    for s in range(0, len(examples), chunk):
        part = list(examples[s : s + chunk])
        if pause is not None:
            pause()
        part_losses, part_answers = engine.validation_pass(part, personal=personal, max_length=max_length,
                                                           max_new_tokens=max_new_tokens or task.max_new_tokens,
                                                           task=task)
        losses += part_losses
        answers += part_answers
    preds, golds = [task.parse_output(a) for a in answers], [e.target for e in examples]
    value = task.score(preds, golds)[metric]
    # Every primary metric (accuracy, MAE, ROUGE) is a mean over items: each item's own value lets
    # a sweep judge the selection rule on items it did not select on (cross_fitted_gain).
    items = tuple(float(task.score([p], [g])[metric]) for p, g in zip(preds, golds))
    return ValScore(loss=float(sum(losses) / len(losses)), metric=float(value), item_losses=tuple(losses),
                    item_metrics=items)


@contextlib.contextmanager
def _dense_weights(engine: Any) -> Iterator[None]:
    """A 4-bit base dequantized once for the whole selection (base score, training, every
    checkpoint) instead of once per scoring call; see shared.quant4bit.dense_4bit_weights."""
    base = getattr(engine, "base", None)
    if base is None or getattr(base, "device", "cpu") != "cpu":
        yield
        return
    with dense_4bit_weights(engine.model):
        yield


def _snapshot(engine: Any) -> dict[str, Any]:
    """A copy of the personal slot's weights (personal_state() is the live tensors)."""
    return {k: v.detach().clone() for k, v in engine.personal_state().items()}


class _Checkpoints:
    """One user's checkpoints during training: the best that beats base, and its state."""

    def __init__(self, engine: Any, task: Any, val_ex: Sequence[Example], sel: Selection, max_length: int,
                 pause: Callable[[], Any] | None, budget: int) -> None:
        self.engine, self.task, self.val_ex, self.sel = engine, task, val_ex, sel
        self.max_length, self.pause, self.budget = max_length, pause, budget
        self.best_state: dict[str, Any] | None = None

    def consider(self, step: int, total: int) -> None:
        """Score the personal slot's current weights on validation; keep them if best so far."""
        sel, base = self.sel, self.sel.base
        s = score(self.engine, self.task, self.val_ex, personal=True, max_length=self.max_length, pause=self.pause,
                  max_new_tokens=self.budget)
        sel.checks.append({"step": step, "loss": s.loss, "metric": s.metric,
                           "items_improved": sum(c < b for c, b in zip(s.item_losses, base.item_losses)),
                           "item_losses": list(s.item_losses), "item_metrics": list(s.item_metrics)})
        sel.total_steps = total
        keep = (sel.rule == "last"  # every checkpoint replaces the one before: the last one is adopted
                or beats(s, base, sel.metric) and (sel.best is None or _better(s, sel.best, sel.metric)))
        if keep:
            sel.best, sel.best_step = s, step
            self.best_state = _snapshot(self.engine)

    def decide(self, cancelled: bool) -> dict[str, Any] | None:
        """Record the decision; the adopted state, or None."""
        if cancelled:
            self.sel.reason = "training cancelled"
            return None
        if self.best_state is None:
            self.sel.reason = "no checkpoint beat base + base adapter on validation (a better metric at a lower loss)"
            return None
        self.sel.adopted = True
        self.sel.reason = ("selection.adopt = last: the last checkpoint, whatever validation says"
                           if self.sel.rule == "last" else "a checkpoint beat base + base adapter on validation")
        return self.best_state


def _prepare(engine: Any, task: Any, examples: Sequence[Example], train: TrainSpec, spec: SelectionSpec,
             pause: Callable[[], Any] | None) -> tuple[list[Example], list[Example], Selection, bool]:
    """Split one user's history into training and validation, score base on validation.
    Returns (train, validation, selection, whether training could change the outcome)."""
    metric = task.metric_names[0]
    n_val = validation_size(len(examples), spec)
    n_train = len(examples) - n_val
    if len(examples) < history_needed(spec):
        return [], [], Selection(
            adopted=False, metric=metric, train_items=max(0, n_train), validation_items=n_val,
            reason=f"too little history: {len(examples)} items; selection needs {history_needed(spec)} "
                   f"({spec.min_train} to train besides the newest held out to validate)"), False
    train_ex, val_ex = list(examples[:n_train]), list(examples[n_train:])
    # The answer budget from the training items only: the held-out answers' lengths are unseen.
    base = score(engine, task, val_ex, personal=False, max_length=train.max_length, pause=pause,
                 max_new_tokens=engine.answer_tokens(task, train_ex))
    sel = Selection(adopted=False, reason="", metric=metric, train_items=n_train, validation_items=n_val, base=base,
                    rule=spec.adopt)
    if spec.adopt == "better" and metric in METRIC_BEST and abs(base.metric - METRIC_BEST[metric]) <= 1e-12:
        # Adoption needs a better metric, and none is better than this: training could not
        # change the outcome (a user who always gives the rating base already answers).
        sel.reason = f"base + base adapter already scores the best {metric} on validation: nothing to adopt"
        return train_ex, val_ex, sel, False
    return train_ex, val_ex, sel, True


def train_and_select(
    engine: Any,
    task: Any,
    examples: Sequence[Example],
    train: TrainSpec,
    spec: SelectionSpec,
    *,
    fresh: bool = True,
    **kw: Any,
) -> tuple[TrainResult, Selection]:
    """THE way a personal adapter is trained: `examples` are the user's history in time order
    (example i retrieving only from items before i). Leaves the engine's personal slot holding
    the adopted adapter, or reset when none is adopted. `kw` goes to Engine.train_personal
    (progress, on_step, should_stop, dp_sgd)."""
    metric = task.metric_names[0]
    # Under record-level DP-SGD, choosing a checkpoint on held-out items would let those items
    # shape the adapter outside the DP guarantee: train on everything, adopt, as the paper does.
    private = kw.get("dp_sgd") is not None
    if not spec.enabled or private:
        result = engine.train_personal(list(examples), train, fresh=fresh, **kw)
        why = "record-level DP-SGD: no validation selection" if private else "selection disabled"
        return result, Selection(adopted=not result.cancelled, reason=f"{why}: always adopted",
                                 metric=metric, train_items=len(examples), validation_items=0,
                                 total_steps=result.steps)
    pause = kw.get("should_stop")
    with engine.lock, _dense_weights(engine):
        train_ex, val_ex, sel, worth = _prepare(engine, task, examples, train, spec, pause)
        if not worth:
            engine.reset_personal()
            return TrainResult(0, len(train_ex), train.epochs, 0, 0), sel
        checks = _Checkpoints(engine, task, val_ex, sel, train.max_length, pause, engine.answer_tokens(task, train_ex))

        def consider(step: int, total: int) -> None:
            checks.consider(step, total)
            engine.resume_personal_training()

        if not fresh:  # continuing a published adapter: its current state is a candidate too
            consider(0, 0)
        result = engine.train_personal(train_ex, train, fresh=fresh, checkpoints=spec.scored_checks,
                                       on_checkpoint=consider, **kw)
        engine.model.eval()
        best_state = checks.decide(result.cancelled)
        if best_state is not None:
            engine.set_personal_state(best_state, label="trained")
        elif not result.cancelled:
            engine.reset_personal()
        return result, sel


def train_and_select_group(
    engine: Any,
    task: Any,
    users: Sequence[Sequence[Example]],
    train: TrainSpec,
    spec: SelectionSpec,
    **kw: Any,
) -> list[tuple[TrainResult, Selection, dict[str, Any] | None]]:
    """train_and_select for several users at once: the same split, base score, checkpoints and
    adoption rule per user, with the users worth training trained together in one pass
    (Engine.train_personal_group). Returns per user (result, selection, adopted state or None);
    the engine's personal slot is left reset. `kw` goes to train_personal_group (progress,
    should_stop)."""
    if not spec.enabled:
        results, states = engine.train_personal_group([list(ex) for ex in users], train, **kw)
        metric = task.metric_names[0]
        return [(r, Selection(adopted=not r.cancelled, reason="selection disabled: always adopted", metric=metric,
                              train_items=len(ex), validation_items=0, total_steps=r.steps),
                 None if r.cancelled else st) for r, st, ex in zip(results, states, users)]
    pause = kw.get("should_stop")
    out: list[tuple[TrainResult, Selection, dict[str, Any] | None]] = []
    with engine.lock, _dense_weights(engine):
        prepared = [_prepare(engine, task, ex, train, spec, pause) for ex in users]
        group = [i for i, (_, _, _, worth) in enumerate(prepared) if worth]
        checks = {i: _Checkpoints(engine, task, prepared[i][1], prepared[i][2], train.max_length, pause,
                                  engine.answer_tokens(task, prepared[i][0]))
                  for i in group}
        results: dict[int, TrainResult] = {}
        if group:
            trained, _ = engine.train_personal_group(
                [prepared[i][0] for i in group], train, checkpoints=spec.scored_checks,
                on_checkpoint=lambda u, step, total: checks[group[u]].consider(step, total), **kw)
            results = dict(zip(group, trained))
        engine.model.eval()
        for i, (train_ex, _, sel, _) in enumerate(prepared):
            if i in results:
                out.append((results[i], sel, checks[i].decide(results[i].cancelled)))
            else:
                out.append((TrainResult(0, len(train_ex), train.epochs, 0, 0), sel, None))
        engine.reset_personal()
    return out


def train_and_select_users(
    engine: Any,
    task: Any,
    users: Sequence[Sequence[Example]],
    train: TrainSpec,
    spec: SelectionSpec,
    **kw: Any,
) -> list[tuple[TrainResult, Selection, dict[str, Any] | None]]:
    """Every user of `users` through selection, `train.users_per_pass` at a time in one pass
    (train_and_select_group), or one at a time where a pass holds one user or the personal
    adapter is a soft prompt (multi-user passes stack LoRA only). Returns per user (result,
    selection, adopted state or None); the personal slot is left reset."""
    per_pass = 1 if getattr(engine, "soft_prompt", None) is not None else train.users_per_pass
    out: list[tuple[TrainResult, Selection, dict[str, Any] | None]] = []
    for start in range(0, len(users), per_pass):
        chunk = users[start : start + per_pass]
        if len(chunk) > 1:
            out += train_and_select_group(engine, task, chunk, train, spec, **kw)
            continue
        result, sel = train_and_select(engine, task, chunk[0], train, spec, **kw)
        # A copy: personal_state() is the slot's live tensors, which the reset below overwrites.
        adopted = _snapshot(engine) if sel.adopted else None
        out.append((result, sel, adopted))
        engine.reset_personal()
    return out
