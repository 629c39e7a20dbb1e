"""decoding.label_choice: for tasks with a closed answer set (labels, ratings) an answer can be
the label a rule picks from the model's own distribution over the labels, instead of free text
that may not parse. Checked here: the distribution is the model's likelihood of each label as the
whole answer, exactly as training scores a target; the rules pick what they promise; every path
that answers a task (Engine.answer with the task) answers with labels only."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from shared.config import DecodingSpec
from shared.inference import choose_label, generate, label_distribution
from shared.tasks import get_task
from shared.training import Example, answer_token_losses, collate, encode_examples

RATINGS = ("1", "2", "3", "4", "5")
PROMPTS = [f"What score from 1 to 5? review: the strings buzz, tuner number {i}" + " and more" * i
           for i in range(5)]


def test_rules_pick_most_likely_median_and_rounded_mean():
    p = [0.10, 0.10, 0.20, 0.25, 0.35]
    assert choose_label(p, RATINGS, "most_likely", True) == "5"
    assert choose_label(p, RATINGS, "median", True) == "4"  # cumulative 0.40 at 3, 0.65 at 4
    assert choose_label(p, RATINGS, "mean", True) == "4"  # 3.65 rounds to 4
    skewed = [0.30, 0.0, 0.0, 0.0, 0.70]  # mean 3.8, median 5: the rules differ
    assert (choose_label(skewed, RATINGS, "mean", True), choose_label(skewed, RATINGS, "median", True)) == ("4", "5")
    # Without an ordered scale median and mean fall back to the most likely label.
    tags = ("comedy", "drama", "horror")
    assert choose_label([0.2, 0.5, 0.3], tags, "median", False) == "drama"
    assert choose_label([0.4, 0.4, 0.2], tags, "most_likely", False) == "comedy"  # a tie: the earlier label
    assert choose_label([0.5, 0.0, 0.0, 0.0, 0.5], RATINGS, "median", True) == "1"  # exactly half reaches it


def test_distribution_is_each_labels_answer_likelihood_as_training_scores_it(varied):
    e = varied
    dist = label_distribution(e.model, e.tokenizer, PROMPTS, RATINGS, batch_size=7)
    e.model.eval()
    pad = e.tokenizer.pad_token_id
    with torch.no_grad():
        for p, row in zip(PROMPTS, dist):
            encoded = encode_examples(e.tokenizer, [Example(p, label) for label in RATINGS], 512)
            logp = []
            for i in range(len(RATINGS)):
                losses, _ = answer_token_losses(e.model, *collate(encoded, [i], pad, e.base.device))
                logp.append(-float(losses.sum()))
            expected = torch.softmax(torch.tensor(logp, dtype=torch.float64), 0).tolist()
            # Left-padded batches of 7 rows against one right-padded row: only roundings differ.
            tol = 1e-4 if e.base.dtype == torch.float32 else 3e-2
            assert row == pytest.approx(expected, abs=tol)
            assert sum(row) == pytest.approx(1.0, abs=1e-9)
    assert max(max(r) for r in dist) - min(min(r) for r in dist) > 0.05  # prompt- and label-dependent


def test_engine_answers_a_label_task_with_labels_only_and_free_text_tasks_as_before(varied):
    e = varied
    task = get_task("amazon-rating")
    greedy = e.answer(PROMPTS, max_new_tokens=4, personal=False)
    assert any(a not in RATINGS for a in greedy)  # the random adapter's free text: the check has teeth
    old = e.decoding
    try:
        e.decoding = dataclasses.replace(old, label_choice="most_likely")
        chosen = e.answer(PROMPTS, max_new_tokens=4, personal=False, task=task)
        dist = label_distribution(e.model, e.tokenizer, PROMPTS, RATINGS, adapter_names=["base"] * len(PROMPTS))
        assert chosen == [choose_label(p, RATINGS, "most_likely", True) for p in dist]
        e.decoding = dataclasses.replace(old, label_choice="median")
        assert e.answer(PROMPTS, max_new_tokens=4, personal=False, task=task) == [
            choose_label(p, RATINGS, "median", True) for p in dist]
        # A generation task has no label set: it generates, label_choice or not.
        title = get_task("amazon-title")
        assert e.answer(PROMPTS, max_new_tokens=4, personal=False, task=title) == greedy
    finally:
        e.decoding = old


def test_label_choice_is_refused_unless_known():
    with pytest.raises(ValueError, match="label_choice='mode'.*generate, most_likely, median, mean"):
        DecodingSpec(label_choice="mode")


def test_generate_without_labels_ignores_label_choice(tiny_engine):
    e = tiny_engine
    spec = DecodingSpec(label_choice="most_likely")
    assert generate(e.model, e.tokenizer, PROMPTS[:2], max_new_tokens=3, decoding=spec) == generate(
        e.model, e.tokenizer, PROMPTS[:2], max_new_tokens=3)


def test_labels_of_several_tokens_behind_a_soft_prompt_score_as_one_unpadded_row_each(varied):
    """The prompt pass is shared by all labels (its KV cache): labels of different token lengths,
    prompts of different lengths in one batch, and a soft prompt in front must still score each
    label exactly as a lone, unpadded row holding prompt + label does."""
    from shared.prompting import encode_answer, encode_prompt
    from shared.soft_prompt import prepend

    e = varied
    tags = ("drama", "science fiction film", "dark comedy based on a book", "romance")
    assert len({len(encode_answer(e.tokenizer, t)) for t in tags}) >= 3  # lengths differ: the check has teeth
    base = e.model.get_base_model() if hasattr(e.model, "get_base_model") else e.model
    emb = base.get_input_embeddings().weight
    soft = (torch.randn(3, emb.shape[1], generator=torch.Generator().manual_seed(2)) * emb.float().std()).to(emb.dtype)
    for prompt in (None, soft):
        dist = label_distribution(e.model, e.tokenizer, PROMPTS, tags, batch_size=3, soft_prompt=prompt)
        e.model.eval()
        with torch.no_grad():
            for p, row in zip(PROMPTS, dist):
                logp = []
                for t in tags:
                    answer = encode_answer(e.tokenizer, t)
                    ids = torch.tensor([encode_prompt(e.tokenizer, p) + answer])
                    mask = torch.ones_like(ids)
                    if prompt is None:
                        logits = e.model(input_ids=ids, attention_mask=mask).logits
                    else:
                        embeds, mask = prepend(base, prompt, ids, mask)
                        logits = e.model(inputs_embeds=embeds, attention_mask=mask).logits
                    lsm = torch.log_softmax(logits[0, -len(answer) - 1:-1].float(), -1)
                    logp.append(float(lsm.gather(1, torch.tensor(answer)[:, None]).sum()))
                # Compared as log-ratios to the first label: labels of more tokens are far less
                # likely on the tiny model, and a probability of 1e-20 would hide any error.
                got = [math.log(q) - math.log(row[0]) for q in row]
                expected = [v - logp[0] for v in logp]
                tol = 1e-3 if e.base.dtype == torch.float32 else 5e-2
                assert got == pytest.approx(expected, abs=tol)


def test_validation_pass_takes_losses_and_answers_from_one_label_pass(varied):
    """Per-user validation scores loss and answer; for a label task one cached pass gives both.
    The losses must equal the loss pass's (example_losses) and the answers the answer path's."""
    e = varied
    task = get_task("amazon-rating")
    examples = [Example(p, str(1 + i % 5)) for i, p in enumerate(PROMPTS)]
    examples.append(Example(PROMPTS[0], "four"))  # not a label: its loss needs its own pass
    old = e.decoding
    try:
        e.decoding = dataclasses.replace(old, label_choice="median")
        losses, answers = e.validation_pass(examples, personal=False, max_length=512, max_new_tokens=4, task=task)
        assert answers == e.answer([x.prompt for x in examples], max_new_tokens=4, personal=False, task=task)
        expected = e.example_losses(examples, personal=False, max_length=512)
        tol = 1e-4 if e.base.dtype == torch.float32 else 3e-2
        assert losses == pytest.approx(expected, rel=tol, abs=tol)
        assert losses[-1] == expected[-1]
        assert len(set(losses[:-1])) > 1  # per-item values, not one number repeated
        # A prompt training would cut (max_length) is scored by the loss pass, exactly.
        short = e.validation_pass(examples[:2], personal=False, max_length=16, max_new_tokens=4, task=task)[0]
        assert short == e.example_losses(examples[:2], personal=False, max_length=16)
        # Generated answers: the two passes, unchanged.
        e.decoding = dataclasses.replace(old, label_choice="generate")
        losses, answers = e.validation_pass(examples, personal=False, max_length=512, max_new_tokens=4, task=task)
        assert losses == expected
        assert answers == e.answer([x.prompt for x in examples], max_new_tokens=4, personal=False, task=task)
    finally:
        e.decoding = old
