"""Decoding options of THE inference path (shared.inference.generate under a DecodingSpec):
first line only, per-row answer budgets, no repeated n-grams, repetition penalty, and the
answer budget from a user's own history."""

from __future__ import annotations

import pytest

from shared.config import DecodingSpec
from shared.inference import answer_tokens, generate
from shared.prompting import first_line

PROMPTS = [f"Write a title for review number {i}: the strings buzz and the tuner slips." for i in range(6)]


@pytest.fixture
def model(tiny_engine):
    """The tiny engine's model with its base adapter only; generated ids recorded per call."""
    m = tiny_engine.model
    calls: list = []
    real = m.generate

    def spy(**kw):
        out = real(**kw)
        calls.append((kw.get("input_ids"), out))
        return out

    m.generate = spy
    yield m, tiny_engine.tokenizer, calls
    del m.generate


def test_first_line_stop_ends_a_row_once_its_first_nonempty_line_is_whole(tiny_engine):
    import torch

    from shared.inference import _FirstLineStop

    tok = tiny_engine.tokenizer
    prompt = tok("Q: title?", add_special_tokens=False)["input_ids"]
    answer = tok("\n  \nGreat strings\nSecond line", add_special_tokens=False)["input_ids"]
    stop = _FirstLineStop(tok, start=len(prompt))
    fired = [bool(stop(torch.tensor([prompt + answer[:n]]), None)[0]) for n in range(1, len(answer) + 1)]
    # Leading blank lines do not end the answer; the newline after "Great strings" does.
    first = fired.index(True)
    assert tok.decode(answer[:first + 1]).strip() == "Great strings" and all(fired[first:])
    assert not any(fired[:first])
    assert first_line("\n  \nGreat strings\nSecond line") == "Great strings"


def test_first_line_only_answers_are_the_first_lines_of_full_answers(model):
    m, tok, _ = model
    full = generate(m, tok, PROMPTS, max_new_tokens=16, decoding=DecodingSpec(stop_at_newline=False))
    cut = generate(m, tok, PROMPTS, max_new_tokens=16, decoding=DecodingSpec(stop_at_newline=True))
    assert cut == [first_line(a) for a in full] and not any("\n" in a for a in cut)


def test_per_prompt_budgets_in_one_batch_equal_each_prompt_alone(model):
    m, tok, _ = model
    spec = DecodingSpec(stop_at_newline=False)
    budgets = [2, 9, 5] * 2
    together = generate(m, tok, PROMPTS[:6], max_new_tokens=budgets, decoding=spec, batch_size=6)
    alone = [generate(m, tok, [p], max_new_tokens=b, decoding=spec)[0] for p, b in zip(PROMPTS[:6], budgets)]
    assert together == alone
    with pytest.raises(ValueError, match="3 prompts but 2 max_new_tokens"):
        generate(m, tok, PROMPTS[:3], max_new_tokens=[1, 2], decoding=spec)


def _repeats(ids: list[int], n: int) -> int:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams))


def test_no_repeat_ngrams_and_repetition_penalty_reach_the_generated_tokens(model):
    m, tok, calls = model
    plain = DecodingSpec(stop_at_newline=False)
    generate(m, tok, PROMPTS, max_new_tokens=16, decoding=plain, batch_size=6)
    (inp, out), = calls
    width = inp.shape[1]
    # A random model loops: greedy answers repeat 2-grams of their own.
    assert sum(_repeats(row[width:].tolist(), 2) for row in out) > 0
    calls.clear()
    generate(m, tok, PROMPTS, max_new_tokens=16, decoding=DecodingSpec(stop_at_newline=False, no_repeat_ngram_size=2),
             batch_size=6)
    (inp, out), = calls
    for row in out.tolist():
        # No generated token closes a 2-gram seen earlier in prompt + answer (HF's rule).
        for p in range(width, len(row)):
            assert tuple(row[p - 1:p + 1]) not in {tuple(row[q - 1:q + 1]) for q in range(1, p)}, p
    calls.clear()
    before = generate(m, tok, PROMPTS, max_new_tokens=16, decoding=plain)
    after = generate(m, tok, PROMPTS, max_new_tokens=16, decoding=DecodingSpec(stop_at_newline=False,
                                                                               repetition_penalty=3.0))
    assert before != after


def test_answer_budget_from_history_lengths(tiny_engine):
    tok = tiny_engine.tokenizer
    targets = ["Great strings", "Good tuner that holds its pitch all evening long"]
    longest = len(tok(targets[1], add_special_tokens=False)["input_ids"])
    assert answer_tokens(tok, targets, 24, DecodingSpec()) == 24  # off: the task's budget
    assert answer_tokens(tok, targets, 24, DecodingSpec(length_from_history=1.0)) == min(24, longest + 1)
    assert answer_tokens(tok, targets, 4, DecodingSpec(length_from_history=1.5)) == 4  # never above the task's
    assert answer_tokens(tok, [], 24, DecodingSpec(length_from_history=1.0)) == 24  # no history yet


@pytest.mark.parametrize("field,value,message", [
    ("repetition_penalty", 0.9, r"decoding.repetition_penalty=0.9 must be >= 1.0"),
    ("no_repeat_ngram_size", -1, r"decoding.no_repeat_ngram_size=-1 must be >= 0"),
    ("length_from_history", -0.5, r"decoding.length_from_history=-0.5 must be >= 0"),
])
def test_bad_decoding_settings_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        DecodingSpec(**{field: value})
