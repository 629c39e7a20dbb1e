"""`oppu sweep`: variants compared on validation items only, one table, a choice."""

from __future__ import annotations

import json

import pytest

from simulations.sweep import load_sweep, run_sweep


def _write(tmp_path, model_dir, variants: str):
    (tmp_path / "exp.toml").write_text(f'''
methods = ["non-personalized", "OPPU+RAG"]
[data]
task = "synthetic-tag"
source = "synthetic"
users = 2
base_users = 2
base_examples = 8
queries = 1
min_history = 8
max_history = 8
[base_model]
path = "{model_dir}"
quantization = "none"
[base_train]
epochs = 1
[personal_train]
epochs = 1
[retrieval]
store = "memory"
''')
    (tmp_path / "sweep.toml").write_text('experiment = "exp.toml"\nusers = 2\n' + variants)
    return tmp_path / "sweep.toml"


def test_sweep_compares_variants_on_validation_only(tmp_path, tiny_model_dir, monkeypatch):
    path = _write(tmp_path, tiny_model_dir, '''
[[variants]]
name = "slow"
set = ["personal_train.lr=1e-5"]
[[variants]]
name = "r4"
set = ["personal_train.lr=1e-2", "personal_adapter.r=4"]
''')
    import shared.selection as selection

    seen: list[str] = []
    real_score = selection.score

    def spy(engine, task, examples, **kw):
        seen.extend(e.prompt for e in examples)
        return real_score(engine, task, examples, **kw)

    monkeypatch.setattr(selection, "score", spy)
    out = run_sweep(path, run_dir=tmp_path / "out", progress=False)
    result = json.loads((out / "sweep.json").read_text())
    assert [r["variant"] for r in result["summary"]] == ["slow", "r4"]
    assert result["choice"] in ("slow", "r4")
    for row in result["variants"].values():
        assert len(row["users"]) == 2 and all(u["base"] is not None and "crossfit" in u for u in row["users"])
        # Every scored state keeps its per-item values, so another adoption rule can be judged later.
        for u in row["users"]:
            n = len(u["base"]["item_metrics"])
            assert n >= 2 and len(u["base"]["item_losses"]) == n and u["checks"]
            assert all(len(c["item_metrics"]) == n for c in u["checks"]) and u["checks"][-1] == u["last"]
    # Only history items were scored: no query text reached validation.
    from shared.data import load_dataset

    spec, variants = load_sweep(path)
    ds = load_dataset(variants[0].data)
    queries = [q.input for u in ds.eval_users for q in u.queries]
    assert seen and not any(q in p for p in seen for q in queries)
    assert "(chosen)" in (out / "sweep.md").read_text()


def test_a_variant_may_not_change_the_base_adapter(tmp_path, tiny_model_dir):
    path = _write(tmp_path, tiny_model_dir, '[[variants]]\nname = "x"\nset = ["base_train.lr=1e-2"]\n')
    with pytest.raises(ValueError, match="variant 'x' changes \\[base_train\\]"):
        load_sweep(path)


def test_inference_sweep_scores_retrieval_variants_on_validation_only(tmp_path, tiny_model_dir, monkeypatch):
    path = _write(tmp_path, tiny_model_dir, '''
[[variants]]
name = "bm25 k=1"
set = ["retrieval.k=1"]
[[variants]]
name = "bm25 k=2"
set = ["retrieval.k=2", "decoding.no_repeat_ngram_size=2"]
''')
    text = path.read_text().replace('users = 2\n', 'users = 2\nmode = "inference"\nmethod = "RAG"\n')
    path.write_text(text)
    from shared.engine import Engine

    seen: list[str] = []
    real_answer = Engine.answer

    def spy(self, prompts, **kw):
        seen.extend(prompts)
        return real_answer(self, prompts, **kw)

    monkeypatch.setattr(Engine, "answer", spy)
    out = run_sweep(path, run_dir=tmp_path / "out", progress=False)
    result = json.loads((out / "sweep.json").read_text())
    assert result["mode"] == "inference" and [r["variant"] for r in result["summary"]] == ["bm25 k=1", "bm25 k=2"]
    assert result["choice"] in ("bm25 k=1", "bm25 k=2")
    # 8 history items per user: the 2 newest are validation (shared.selection.validation_size).
    assert result["validation_items"] == 4 and all(len(g) == 2 for g in result["golds"])
    for name, k in (("bm25 k=1", 1), ("bm25 k=2", 2)):
        retrieved = result["variants"][name]["retrieved"]
        assert [len(r) for user in retrieved for r in user] == [k] * 4
        assert len(result["variants"][name]["repeat"]) == 2  # each user: one pair of questions
    spec, variants = load_sweep(path)
    from shared.data import load_dataset

    ds = load_dataset(variants[0].data)
    queries = [q.input for u in ds.eval_users for q in u.queries]
    assert seen and not any(q in p for p in seen for q in queries)
    md = (out / "sweep.md").read_text()
    assert "(chosen)" in md and "same top item" in md


def test_repeat_rate_counts_questions_handed_the_same_top_item():
    from simulations.inference_sweep import repeat_rates

    rates = repeat_rates([[["a"], ["a"], ["b"]], [["x", "y"], ["y", "x"]], [["z"]]])
    assert rates == [{"same_top": 1 / 3, "distinct": 2 / 3}, {"same_top": 0.0, "distinct": 0.5}]


def test_an_inference_sweep_may_vary_only_retrieval_and_decoding(tmp_path, tiny_model_dir):
    path = _write(tmp_path, tiny_model_dir, '[[variants]]\nname = "x"\nset = ["personal_train.lr=1e-2"]\n')
    path.write_text(path.read_text().replace('users = 2\n', 'users = 2\nmode = "inference"\nmethod = "RAG"\n'))
    with pytest.raises(ValueError, match=r"variant 'x' changes \[personal_train\]; an inference sweep"):
        load_sweep(path)


def test_a_personal_sweep_reuses_a_saved_base_adapter(tmp_path, tiny_model_dir, monkeypatch):
    """base_adapter_dir: the personal variants start from that base adapter, none is trained."""
    path = _write(tmp_path, tiny_model_dir, '[[variants]]\nname = "a"\nset = ["personal_train.lr=1e-3"]\n')
    first = run_sweep(path, run_dir=tmp_path / "first", progress=False)
    saved = first / "base_adapter"
    assert (saved / "adapter_model.safetensors").is_file()
    from shared.engine import Engine

    def no_training(self, *a, **kw):
        raise AssertionError("the base adapter was trained although base_adapter_dir names one")

    loaded: list[str] = []
    real_load = Engine.load_base

    def spy_load(self, directory, *a, **kw):
        loaded.append(str(directory))
        return real_load(self, directory, *a, **kw)

    monkeypatch.setattr(Engine, "train_base", no_training)
    monkeypatch.setattr(Engine, "load_base", spy_load)
    out = run_sweep(path, [f'base_adapter_dir="{saved}"'], run_dir=tmp_path / "second", progress=False)
    result = json.loads((out / "sweep.json").read_text())
    assert loaded == [str(saved)] and result["base_adapter"] == str(saved)
    # Same base adapter, same data and seed: the same base scores on validation as the first sweep.
    before = json.loads((first / "sweep.json").read_text())["variants"]["a"]["users"]
    after = result["variants"]["a"]["users"]
    assert all(abs(a["base"]["loss"] - b["base"]["loss"]) <= 1e-3 * max(1.0, b["base"]["loss"])
               for a, b in zip(after, before))


def test_the_choice_is_the_best_cross_fitted_gain_not_the_optimistic_selected_score():
    """A variant whose selected score is best only because it fitted the validation items it was
    chosen on loses to one whose gain holds on the item left out."""
    from simulations.sweep import render_sweep, summarize

    def user(selected: float, crossfit: float) -> dict:
        return {"adopted": True, "base": {"loss": 1.0, "metric": 0.5}, "selected": {"loss": 0.5, "metric": selected},
                "last": {"loss": 0.5, "metric": selected}, "crossfit": crossfit}

    rows = {"lucky": {"set": [], "seconds": 1.0, "users": [user(0.0, -0.5), user(0.0, 0.0)]},
            "steady": {"set": [], "seconds": 1.0, "users": [user(0.25, 0.25), user(0.25, 0.0)]}}
    table, choice = summarize(rows, "mae")
    assert choice == "steady"
    assert [r["crossfit_gain"][0] for r in table] == [-0.25, 0.125]
    md = render_sweep({"task": "amazon-rating", "method": "OPPU+RAG", "users": ["a", "b"], "metric": "mae",
                       "summary": table, "choice": choice, "seconds": 2.0})
    assert "cross-fitted gain [95% CI]" in md and "steady **(chosen)**" in md
    # Rows written before per-item scores existed: the choice falls back to the selected score.
    for row in rows.values():
        for u in row["users"]:
            u.pop("crossfit")
    assert summarize(rows, "mae")[1] == "lucky"


def test_rules_are_compared_on_a_runs_recorded_checkpoints(tmp_path, capsys):
    """`oppu sweep --rules-from RUN`: selection over every recorded checkpoint, over the last only,
    and always adopting the last, judged on the validation records alone (cross-fitted gain)."""
    from oppu.cli import main
    from simulations.sweep import recorded_rules

    def score(metrics, losses):
        return {"loss": sum(losses) / 2, "metric": sum(metrics) / 2, "item_metrics": metrics, "item_losses": losses}

    base = score([0.0, 0.0], [2.0, 2.0])
    early = {"step": 2, **score([1.0, 1.0], [1.0, 1.0])}  # beats base on each item
    last = {"step": 4, **score([0.0, 1.0], [3.0, 3.0])}  # a better metric at a higher loss: never beats base
    rec = {"adopted": True, "reason": "", "metric": "accuracy", "train_items": 8, "validation_items": 2,
           "base": base, "checks": [early, last], "rule": "better"}
    for user, r in {"u1": rec, "u2": {**rec, "checks": []}}.items():  # u2: nothing trained, left out
        (tmp_path / "users" / user).mkdir(parents=True)
        (tmp_path / "users" / user / "selection.json").write_text(json.dumps({"rag": r}))
    table = recorded_rules(tmp_path)
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:5]]
            for line in table.splitlines()[2:]}
    assert rows["selection over every recorded checkpoint"] == ["1/1", "+1.0000 [+1.0000, +1.0000]"]
    assert rows["selection on the last checkpoint only"] == ["0/1", "+0.0000 [+0.0000, +0.0000]"]
    assert rows["always adopt the last checkpoint"] == ["1/1", "+0.5000 [+0.5000, +0.5000]"]
    assert main(["sweep", "--rules-from", str(tmp_path)]) == 0
    assert table in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="selection.json"):
        recorded_rules(tmp_path / "users")


def test_a_broken_selection_record_is_named(tmp_path):
    from simulations.sweep import recorded_rules

    (tmp_path / "users" / "u1").mkdir(parents=True)
    bad = tmp_path / "users" / "u1" / "selection.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="u1/selection.json: not a readable selection record"):
        recorded_rules(tmp_path)
    bad.write_text(json.dumps({"rag": {"base": {"loss": 1.0, "metric": 0.0}, "checks": [{"step": 1}]}}))
    with pytest.raises(ValueError, match="u1/selection.json: the 'rag' record lacks 'metric'"):
        recorded_rules(tmp_path)
