"""`oppu study NAME`: the variants each study runs, history formats in prompts, and one study
end to end on the tiny model."""

import json

import pytest

from shared.config import RetrievalSpec, load_experiment
from shared.personalize import Context, prompt_for
from shared.records import HistoryItem
from shared.retrieval import InMemoryHistoryStore, make_retriever
from shared.tasks import get_task
from simulations.studies import STUDIES, study_specs


def test_each_study_varies_what_it_studies_and_nothing_else():
    spec = load_experiment(None, ["data.users=5", "retrieval.k=2"])
    shift = study_specs("shift", spec, methods_given=False)
    assert {v: s.data.history_topics for v, s in shift.items()} == {"similar": "similar", "shifted": "shifted"}
    peft = study_specs("peft", spec, methods_given=False)
    assert [s.personal_adapter.peft_type for s in peft.values()] == ["lora", "ia3", "prompt_tuning"]
    assert all(s.methods == ("non-personalized", "OPPU") for s in peft.values())
    fmt = study_specs("format", spec, methods_given=True)
    assert [s.retrieval.item_format for s in fmt.values()] == ["template", "json", "fields"]
    assert all(s.methods == spec.methods and s.data.users == 5 and s.retrieval.k == 2 for s in fmt.values())
    assert study_specs("activity", spec, methods_given=False)["by-activity"].data.select == "activity"
    assert set(STUDIES) == {"activity", "shift", "format", "peft"}
    with pytest.raises(ValueError, match="activity, shift, format, peft"):
        study_specs("seasons", spec, methods_given=False)


@pytest.mark.parametrize("fmt, expected", [("template", "- rated 4: warm tone"),
                                           ("json", '- {"text": "warm tone", "score": "4"}'),
                                           ("fields", "- text: warm tone; score: 4")])
def test_history_format_changes_how_retrieved_records_are_written(fmt, expected):
    task = get_task("amazon-rating")
    store = InMemoryHistoryStore(task.item_text)
    store.add([HistoryItem("a", {"text": "warm tone", "score": "4"}, time=1)])
    spec = RetrievalSpec(k=1, store="memory", item_format=fmt)
    prompt = prompt_for(task, Context(store, make_retriever("bm25", task.item_text), spec), "Rate: warm tone", "rag")
    assert expected in prompt


def test_shift_study_end_to_end(tiny_model_dir, tmp_path):
    from oppu.cli import main

    out = tmp_path / "study"
    args = ["study", "shift", "--model", str(tiny_model_dir), "--quantization", "none", "--task", "amazon-rating",
            "--source", "real", "--users", "1", "--methods", "non-personalized,OPPU", "--run-dir", str(out), "--quiet"]
    for ov in ["data.base_users=2", "data.base_examples=4", "data.min_history=6", "data.max_history=6",
               "data.queries=1", "personal_train.epochs=1"]:
        args += ["--set", ov]
    assert main(args) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["variants"]) == {"similar", "shifted"} and summary["methods"] == ["non-personalized", "OPPU"]
    similar = json.loads((out / "similar" / "data.json").read_text())["users"]
    shifted = json.loads((out / "shifted" / "data.json").read_text())["users"]
    assert similar.keys() == shifted.keys()  # the same users, different halves of their history
    for name in ("REPORT.md", "plots/study.png", "similar/REPORT.md", "shifted/plots/methods.png"):
        assert (out / name).is_file(), name
    assert "| shifted" in (out / "metrics.md").read_text()
    from simulations.reproduce import answers

    assert len(answers(out)) == 2 * 2  # two variants x two methods x one query

