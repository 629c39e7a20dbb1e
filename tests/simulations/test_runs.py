"""Run directories on the tiny model: what a run writes, the centralized baseline's pooled data,
the one-page report of one or several runs, and `oppu reproduce`'s verdict."""

import json

import pytest

from shared.config import load_experiment
from shared.data import load_dataset
from simulations.centralized import pooled_examples, run_centralized

TINY = ['base_model.quantization="none"', 'data.task="synthetic-tag"', 'data.source="synthetic"', "data.users=3",
        "data.base_users=3", "data.queries=2", "data.min_history=6", "data.max_history=8", "data.base_examples=12",
        'retrieval.store="memory"', "personal_train.epochs=1", "retrieval.profile_max_tokens=6",
        'data.select="activity"', 'methods=["non-personalized", "RAG", "OPPU", "centralized"]']


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    from simulations.experiment import run_experiment

    spec = load_experiment(None, [f'base_model.path="{tiny_model_dir}"', *TINY])
    return run_experiment(spec, tmp_path_factory.mktemp("runs") / "tiny", progress=False)


def test_run_directory_is_self_contained(tiny_run):
    for name in ("config.toml", "run.json", "data.json", "metrics.json", "metrics.md", "REPORT.md",
                 "plots/methods.png", "predictions/centralized.json", "centralized_adapter/oppu_adapter.json"):
        assert (tiny_run / name).is_file(), name
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    data = json.loads((tiny_run / "data.json").read_text())
    assert metrics["methods"] == ["non-personalized", "RAG", "OPPU", "centralized"]
    assert set(metrics["per_user"]) == set(data["users"])
    assert all(info["level"] in ("low", "medium", "high") for info in data["users"].values())
    assert sum(v["users"] for v in metrics["by_level"].values()) == 3
    assert json.loads((tiny_run / "run.json").read_text())["kind"] == "experiment"
    md = (tiny_run / "metrics.md").read_text()
    assert "## Per user" in md and "centralized" in md and "activity" in md
    assert (tiny_run / "plots" / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_table_says_how_sure_it_is(tiny_run):
    """results.md, metrics.md and REPORT.md: CIs over users, paired differences, non-LLM baselines."""
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    stats = metrics["stats"]
    assert metrics["baselines"]["methods"] == ["baseline: user majority", "baseline: global majority"]
    assert stats["users"] == 3 and stats["permutation"] == "exact" and stats["references"][:2] == ["non-personalized", "RAG"]
    for m in metrics["methods"] + metrics["baselines"]["methods"]:
        ci = stats["ci"][m]["accuracy"]
        assert ci["lo"] <= ci["mean"] <= ci["hi"]
    for name in ("results.md", "metrics.md", "REPORT.md"):
        text = (tiny_run / name).read_text()
        assert "accuracy ↑ [95% CI]" in text and "Δaccuracy vs non-pers. [95% CI]" in text, name
        assert "| baseline: user majority" in text and "percentile bootstrap over the 3 users" in text, name


def test_centralized_baseline_trains_one_adapter_on_all_users_pooled_histories(tiny_engine):
    spec = load_experiment(None, TINY)
    ds = load_dataset(spec.data)
    from shared.tasks import get_task

    task = get_task(ds.task)
    pooled = pooled_examples(task, ds.eval_users, seed=0)
    expected = sorted(task.item_to_example(it)[1] for u in ds.eval_users for it in u.history)
    assert sorted(ex.target for ex in pooled) == expected  # every user's history, nobody else's
    tiny_engine.reset_personal()  # the engine is shared: earlier tests may have left a user's adapter in the slot
    before = {k: v.clone() for k, v in tiny_engine.personal_state().items()}
    out = run_centralized(tiny_engine, task, spec, ds.eval_users)
    assert out.train["examples"] == sum(len(u.history) for u in ds.eval_users) and out.train["steps"] > 0
    assert set(out.predictions) == {u.user_id for u in ds.eval_users}
    assert all(len(out.predictions[u.user_id]) == len(u.queries) for u in ds.eval_users)
    after = tiny_engine.personal_state()
    assert all((after[k] == before[k]).all() for k in before)  # the slot is reset for the next user


def test_report_renders_two_runs_side_by_side(tiny_run, tmp_path):
    import shutil

    from oppu.cli import main

    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    cfg = (other / "config.toml").read_text().replace("k = 1", "k = 3")
    (other / "config.toml").write_text(cfg)
    out = tmp_path / "page" / "compare.md"
    assert main(["report", str(tiny_run), str(other), "--out", str(out)]) == 0
    page = out.read_text()
    assert "## Comparison" in page and "retrieval.k" in page  # the setting that differs
    assert "by method (pooled [95% CI over users])" in page and "baseline: user majority" in page
    assert f"## {tiny_run.name}" in page and "## other" in page
    links = [line.split("](")[1].rstrip(")") for line in page.splitlines() if line.startswith("![")]
    assert len(links) >= 4 and all((out.parent / link).is_file() for link in links)


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    from simulations.reports.page import write_report

    with pytest.raises(ValueError, match="not a finished run directory"):
        write_report([tmp_path])


def test_rerun_reproduces_the_metrics_and_a_changed_score_is_caught(tiny_run, tmp_path):
    from simulations.reproduce import compare, reproduce, verdict

    out, result = reproduce(tiny_run, tmp_path / "rerun", progress=False)
    assert result["reproduced"], result["verdict"]
    assert result["answers"]["answers"] > 0 and result["answers"]["changed"] == 0
    assert result["verdict"].startswith("REPRODUCED")
    original = json.loads((tiny_run / "metrics.json").read_text())
    tampered = json.loads((out / "metrics.json").read_text())
    user = next(iter(tampered["per_user"]))
    tampered["per_user"][user]["OPPU"]["accuracy"] += 0.5
    bad = compare(original, tampered)
    assert not bad["reproduced"] and bad["differ"] == 1 and verdict(bad).startswith("NOT REPRODUCED")
    assert compare(original, tampered, tolerance=0.6)["reproduced"]


@pytest.mark.slow
def test_simulate_run_directory_reproduces(tiny_model_dir, tmp_path):
    """The Flower path: a federated run with DP noise, rerun from its directory, same scores."""
    import inprocess_federation as fedkit

    from oppu.cli import main

    run = tmp_path / "sim"
    args = ["simulate", "--model", str(tiny_model_dir), "--users", "3", "--rounds", "2", "--run-dir", str(run),
            "--methods", "non-personalized,OPPU,centralized", "--clients-per-round", "2"]
    for ov in fedkit.BASE_OVERRIDES + [f'federation.client_cache="{tmp_path / "cache"}"']:
        if not ov.startswith(("methods", "data.users", "federation.rounds")):
            args += ["--set", ov]
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert "centralized" in metrics["aggregate"] and len(metrics["rounds"]) == 2
    # Under DP each user takes part with q = 2/3 (Poisson), seeded by the default config's
    # federation.sampling_seed, which the run's privacy.json states.
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["user_level"]["epsilon"] > 0 and privacy["user_level"]["sample_rates"] == [2 / 3, 2 / 3]
    assert privacy["user_level"]["note"] == "sampling seeded for reproducibility: the epsilon assumes the seed is secret"
    assert main(["reproduce", str(run), "--into", str(tmp_path / "again"), "--quiet"]) == 0
    result = json.loads((tmp_path / "again" / "reproduce.json").read_text())
    assert result["reproduced"] and result["answers"]["changed"] == 0, result["verdict"]
