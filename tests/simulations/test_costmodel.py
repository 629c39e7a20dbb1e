"""The cost model of `oppu simulate` (simulations/bench/costmodel.py): its arithmetic on hand-made
work and coefficients, and what it reads from a simulate config. Nothing here is timed."""

import json
import random

import pytest

from simulations.bench.costmodel import (
    AnswerCost, Coefficients, Personalization, ProcessCosts, Rows, TrainCost, TrainWork, UserWork, Workload,
    load_spec, predict, read_coefficients, spread, train_work, workload,
)


def coefficients() -> Coefficients:
    worker = ProcessCosts(threads=1, load_s=10.0, train=TrainCost(call_s=1.0, step_s=0.5, token_s=0.01),
                          answer=AnswerCost(call_s=0.2, row_s=0.1, token_s=0.001),
                          score=AnswerCost(call_s=0.3, row_s=0.05, token_s=0.002), selection_s=0.4, user_task_s=0.25)
    driver = ProcessCosts(threads=2, load_s=5.0, train=TrainCost(call_s=2.0, step_s=0.25, token_s=0.005),
                          answer=AnswerCost(call_s=0.1, row_s=0.05, token_s=0.0005))
    return Coefficients(worker=worker, driver=driver, prepare_user_s=0.5, ray_start_s=3.0, concurrent_workers=2)


def user(train_steps: int) -> UserWork:
    return UserWork(
        queries={"plain": Rows(4, 400), "rag": Rows(4, 800)},
        personal={"plain": Personalization(Rows(2, 200), TrainWork(train_steps, 1000), True)},
        local_base=TrainWork(3, 900))


def test_spread_gives_each_next_task_to_the_first_free_worker():
    assert spread([], 2) == 0.0
    assert spread([5.0, 3.0, 3.0], 2) == 6.0  # 5 | 3+3
    assert spread([5.0, 3.0, 3.0], 1) == 11.0
    assert spread([1.0] * 5, 2) == 3.0


def test_prediction_adds_up_the_phases_from_the_coefficients():
    c = coefficients()
    w = Workload(users=[user(4), user(2)], initial_base=TrainWork(8, 4000), centralized=TrainWork(10, 5000),
                 centralized_queries=[Rows(4, 400), Rows(4, 400)], sampled=[[0]], rounds=1, evaluate_between=[],
                 evaluate_before=True, methods=("non-personalized", "OPPU", "centralized"), workers=2, checks=2,
                 federate=True, sampling="test")
    p = predict(w, c)
    assert p.phases["start-up"] == pytest.approx(2 * 0.5 + 5.0 + 3.0)
    assert p.phases["initial base adapter"] == pytest.approx(2.0 + 0.25 * 8 + 0.005 * 4000)
    plain_answer = 0.2 + 0.1 * 4 + 0.001 * 400  # 1.0
    # Two users on two workers, each worker loading the model with its first user (10 s).
    assert p.phases["evaluation before round 1"] == pytest.approx(10.0 + 0.25 + plain_answer)
    score = 0.3 + 0.05 * 2 + 0.002 * 200  # 0.8, one chunk of two items
    selection = {4: 0.4 + score + (1.0 + 0.5 * 4 + 10.0) + 2 * score, 2: 0.4 + score + (1.0 + 0.5 * 2 + 10.0) + 2 * score}
    local = 1.0 + 0.5 * 3 + 0.01 * 900
    assert p.phases["round 1"] == pytest.approx(0.25 + selection[4] + local)  # user 0 alone
    # Final: both users answer for both methods; user 1 was never sampled and trains here first.
    assert p.phases["final evaluation"] == pytest.approx(0.25 + selection[2] + 2 * plain_answer)
    assert p.phases["centralized baseline"] == pytest.approx(5.0 + 2.0 + 0.25 * 10 + 0.005 * 5000
                                                             + 2 * (0.1 + 0.05 * 4 + 0.0005 * 400))
    assert p.total == pytest.approx(sum(p.phases.values()))
    # Skipped trainings remove the training and its checkpoints' scoring, never base's scoring.
    skipped = predict(w, c, skipped=1.0)
    assert skipped.phases["round 1"] == pytest.approx(0.25 + 0.4 + score + local)
    assert predict(w, c, skipped=0.5).total == pytest.approx((p.total + skipped.total) / 2)
    with pytest.raises(ValueError, match="between 0 and 1"):
        predict(w, c, skipped=1.5)


def test_evaluations_between_rounds_and_without_federation():
    c = coefficients()
    w = Workload(users=[user(4)], initial_base=TrainWork(0, 0), centralized=TrainWork(0, 0), centralized_queries=[],
                 sampled=[[0], []], rounds=2, evaluate_between=[1], evaluate_before=False,
                 methods=("non-personalized",), workers=1, checks=0, federate=False, sampling="test")
    p = predict(w, c)
    assert "evaluation before round 1" not in p.phases and "centralized baseline" not in p.phases
    assert p.phases["initial base adapter"] == 0.0
    score = 0.3 + 0.05 * 2 + 0.002 * 200
    # No evaluation before: the model loads with the round's first user; no local base update.
    assert p.phases["round 1"] == pytest.approx(10.0 + 0.25 + 0.4 + score + 13.0 + 0.25 + 1.0)
    assert p.phases["round 2"] == 0.0


def test_a_round_with_cohorts_trains_each_cohort_as_one_task_then_every_local_update():
    """coordinator/cohorts.py: 3 sampled users by 2 per pass are a cohort of users 0 and 1 (one
    task, their personal trainings one after another) and user 2 alone (its train message)."""
    import dataclasses

    c = coefficients()
    w = Workload(users=[user(4), user(4), user(4)], initial_base=TrainWork(0, 0), centralized=TrainWork(0, 0),
                 centralized_queries=[], sampled=[[0, 1, 2]], rounds=1, evaluate_between=[], evaluate_before=True,
                 methods=("non-personalized", "OPPU"), workers=2, checks=0, federate=True, sampling="test",
                 per_pass=2)
    score = 0.3 + 0.05 * 2 + 0.002 * 200
    personal = 0.4 + score + (1.0 + 0.5 * 4 + 10.0)  # one user's selection, no checkpoints
    local = 1.0 + 0.5 * 3 + 0.01 * 900
    cohort = 2 * (0.25 + personal)  # one worker, both users
    train = spread([0.25 + local, 0.25 + local, 0.25 + personal + local], 2)
    assert predict(w, c).phases["round 1"] == pytest.approx(cohort + train)
    alone = predict(dataclasses.replace(w, per_pass=1), c).phases["round 1"]
    assert alone == pytest.approx(spread([0.25 + personal + local] * 3, 2))


def test_reads_a_simulate_config(embedded_model_dir):
    """Users, rounds, who is sampled (the coordinator's seeded draw), and the training plan's
    steps, all as the simulation would have them."""
    from transformers import AutoTokenizer

    from coordinator.sampling import sample_round
    from shared.training import Example, encode_examples, step_plan

    spec = load_spec(None, 5, 3, ['data.task="synthetic-tag"', 'data.source="synthetic"', "data.base_users=2",
                                  "data.base_examples=8", "data.queries=2", "data.min_history=6",
                                  "data.max_history=6", 'retrieval.store="memory"',
                                  'methods=["non-personalized", "OPPU", "OPPU+RAG"]'])
    assert spec.experiment.data.users == 5 and spec.federation.rounds == 3
    w = workload(spec, cores=2)
    assert len(w.users) == 5 and w.rounds == 3 and w.workers == 2
    assert w.sampled == [sample_round(list(range(5)), spec, r)[0] for r in (1, 2, 3)]
    assert w.evaluate_between == [1, 2] and w.evaluate_before
    assert w.per_pass == spec.experiment.personal_train.users_per_pass == 4  # cohorts apply (OPPU, LoRA)
    assert w.centralized.steps == 0  # no centralized method asked for
    u = w.users[0]
    assert set(u.personal) == {"plain", "rag"} and set(u.queries) == {"plain", "rag"}
    assert u.queries["plain"].rows == 2 and u.queries["rag"].tokens > u.queries["plain"].tokens
    p = u.personal["plain"]
    assert p.trains and p.validation.rows == 2  # max(min_validation 2, ceil(6 * 0.2))
    assert p.train.steps == 2 * 1  # 4 training items, batch 4, 2 epochs (personal_train of simulate.toml)
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir))
    examples = [Example("a short prompt", "x"), Example("a much longer prompt than that one " * 3, "yz")]
    t = spec.experiment.base_train
    enc = encode_examples(tok, examples, t.max_length)
    plan = step_plan(enc, t, random.Random(t.seed))
    got = train_work(tok, examples, t)
    assert got.steps == len(plan)
    assert got.padded_tokens == sum(len(b) * max(len(enc[i].input_ids) for i in b) for b in plan)


def test_refuses_what_it_cannot_predict_and_names_the_fix(tmp_path):
    spec = load_spec(None, 3, 1, ['methods=["PAG"]'])
    with pytest.raises(SystemExit, match="PAG"):
        workload(spec, cores=2)
    with pytest.raises(SystemExit, match="--sections costmodel"):
        read_coefficients(tmp_path / "missing.json")
    f = tmp_path / "results.json"
    f.write_text(json.dumps({"jobs": {"training:nf4:ours": {}}}))
    with pytest.raises(SystemExit, match="no costmodel measurement"):
        read_coefficients(f)


def test_reads_coefficients_from_bench_results(tmp_path):
    c = coefficients()
    proc = lambda p: {"threads": p.threads, "load_s": p.load_s, "train": vars(p.train), "answer": vars(p.answer),  # noqa: E731
                      **({"score": vars(p.score)} if p.score else {}), "selection_s": p.selection_s,
                      "user_task_s": p.user_task_s}
    job = {"worker": proc(c.worker), "driver": proc(c.driver), "prepare_user_s": 0.5, "ray_start_s": 3.0,
           "concurrent_workers": 2}
    f = tmp_path / "results.json"
    f.write_text(json.dumps({"jobs": {"costmodel": job}}))
    assert read_coefficients(f) == c
