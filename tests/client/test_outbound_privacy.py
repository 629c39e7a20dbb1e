"""Nothing private leaves a client: every message a ClientApp sends in a federated run (artifact
inventory, chunk acks, train and evaluate replies, error replies) is captured as wire bytes and
searched for the users' personal-adapter tensors, history texts, queries, retrieved texts and
generated profiles; under DP a deployed client sends no per-user numbers, and what each reply
carries is what docs/federation.md ("What each message carries") lists."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import inprocess_federation as fedkit
from shared.protocol import ARRAYS

DOCS = Path(__file__).resolve().parents[2] / "docs" / "federation.md"


def _documented_replies():
    """message row -> the record names the docs' table lists (in backticks) in its reply column."""
    text = DOCS.read_text()
    table = text[text.index("## What each message carries"):]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0]] = set(re.findall(r"`([^`]+)`", cells[2]))
    return rows


def _records(reply):
    c = reply.content
    return {**{k: set(r.keys()) for k, r in c.array_records.items()},
            **{k: set(r.keys()) for k, r in c.config_records.items()},
            **{k: set(r.keys()) for k, r in c.metric_records.items()}}


def _private_texts(run, names, task):
    from shared.records import HistoryItem

    texts = set()
    for n in names:
        d = run / "users" / n
        for item in json.loads((d / "history.json").read_text()):
            it = HistoryItem(item["id"], item["fields"], item.get("time", 0))
            texts.add(task.render_item(it)[:40])
            texts.update(v[:40] for v in it.fields.values() if len(v) >= 12)
        texts.update(q["input"][-40:] for q in json.loads((d / "queries.json").read_text()))
        profile = d / "federation" / "profile.txt"
        if profile.exists() and len(profile.read_text().strip()) >= 16:
            texts.add(profile.read_text().strip()[:40])
    return {t for t in texts if len(t) >= 12}


def _personal_tensors(run, names):
    from safetensors.numpy import load_file

    out = []
    for n in names:
        for f in (run / "users" / n).glob("personal*/v*/adapter_model.safetensors"):
            for v in load_file(str(f)).values():
                if np.any(v):
                    out.append(np.ascontiguousarray(v, dtype=np.float32).tobytes())
    return out


@pytest.mark.parametrize("secagg", [False, True], ids=["dp-fedavg", "secagg+dp"])
def test_no_private_content_in_any_outgoing_message(tmp_path, tiny_model_dir, monkeypatch, secagg):
    from shared.tasks import get_task

    run = tmp_path / "run"
    spec = fedkit.tiny_spec(
        tiny_model_dir, run, "privacy.federate_base_adapter=true", "privacy.noise_multiplier=0.5",
        "privacy.clipping_norm=1.0", "retrieval.k=2", "federation.evaluate_every=1",
        'methods=["non-personalized", "RAG", "PAG", "OPPU", "OPPU+RAG", "OPPU+PAG"]', "data.users=2",
        f"federation.secagg={'true' if secagg else 'false'}", *(["federation.rounds=1"] if secagg else []))
    ds, names = fedkit.prepare(spec, run)
    sent_updates = []
    replies = []  # (message type, {record name: its keys})

    def keep(node, reply):
        if reply.metadata.message_type == "train" and not reply.has_error() and ARRAYS in reply.content.array_records:
            sent_updates.append({k: a.numpy().tobytes() for k, a in reply.content[ARRAYS].items()})
        if not reply.has_error():
            replies.append((reply.metadata.message_type, _records(reply)))
        return reply

    grid = fedkit.local_grid(spec, run, names, intercept=keep)
    summary = fedkit.run(spec, run, grid)
    assert summary["status"] == "completed" and summary["epsilon"] > 0

    # An error whose text quotes a history item must not carry that text back.
    import client.rounds as rounds

    task = get_task(ds.task)
    secret = task.render_item(ds.eval_users[0].history[0])
    monkeypatch.setattr(rounds, "train", lambda *a, **k: (_ for _ in ()).throw(ValueError(secret)))
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from shared.protocol import RoundConfig

    cfg = RoundConfig(server_round=9, task=ds.task, model="a" * 64, base_adapter="b" * 64).to_record()
    msg = Message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord(cfg)}),
                  dst_node_id=grid.get_node_ids()[0], message_type="train")
    (err,) = grid.send_and_receive([msg])
    assert err.has_error() and "ValueError" in err.error.reason and secret not in err.error.reason

    types = {t for _, t, _ in grid.outbox}
    assert types == {"query.identify", "query.inventory", "query.artifact", "train", "evaluate"}
    blob = b"\n".join(b for _, _, b in grid.outbox)

    # Positive controls: the search does find what is really sent.
    assert bool(sent_updates) != secagg  # under SecAgg+ no update travels in the clear
    assert all(v in blob for u in sent_updates for v in u.values())
    texts = _private_texts(run, names, task)
    tensors = _personal_tensors(run, names)
    assert len(texts) > 20 and len(tensors) > 8
    assert any(t.encode() in (run / "users" / names[0] / "history.json").read_bytes() for t in texts)

    # Under DP a deployed client (these nodes name their data directories) sends no per-user
    # numbers: every metrics record is empty, SecAgg+'s FitRes metrics too.
    for kind, records in replies:
        for name in ("metrics", "fitres.metrics"):
            assert not records.get(name), (kind, name, records[name])
    # What each reply carries is what docs/federation.md lists for that message.
    documented = _documented_replies()
    for kind, records in replies:
        row = "`train` under SecAgg+" if kind == "train" and secagg else f"`{kind}`"
        assert row in documented, f"docs/federation.md has no row for {row}"
        assert set(records) <= documented[row], (row, set(records) - documented[row])
        if kind in ("query.inventory", "query.artifact"):
            assert records["reply"] <= documented[row], (row, records["reply"])
    kinds = {k for k, _ in replies}
    assert kinds == {"query.identify", "query.inventory", "query.artifact", "train", "evaluate"}

    leaked_text = [t for t in texts if t.encode() in blob]
    leaked_tensors = [i for i, t in enumerate(tensors) if t in blob]
    assert not leaked_text, leaked_text[:3]
    assert not leaked_tensors
    # And the users' directories did get what stays home.
    for n in names:
        d = run / "users" / n
        assert (d / "personal" / "CURRENT").exists() and (d / "predictions.json").exists()
        assert json.loads((d / "federation.json").read_text())["epsilon"] == pytest.approx(
            summary["rounds"][json.loads((d / "federation.json").read_text())["rounds"] - 1]["epsilon"], rel=1e-6)


def test_per_user_numbers_leave_only_when_allowed(tmp_path):
    """client.rounds.reply_metrics: under DP a deployed client sends its numbers only when the
    operator opted in and the user's node config does not refuse; simulated users and runs
    without DP send them."""
    from client.rounds import node_from, reply_metrics
    from shared.config import load_federated, to_run_config

    numbers = {"num-examples": 6.0, "base-loss": 0.4, "non-personalized/accuracy": 0.5}
    dp = ["privacy.federate_base_adapter=true", "privacy.noise_multiplier=1.0"]
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "index.json").write_text(json.dumps(["u0"]))
    (tmp_path / "users" / "u0").mkdir()

    def sent(overrides, node_config):
        spec = load_federated(None, [*overrides, f'federation.run_dir="{tmp_path}"'])
        return reply_metrics(node_from(to_run_config(spec), node_config), numbers)

    deployed, simulated = {"data-dir": str(tmp_path / "users" / "u0")}, {"partition-id": 0}
    assert sent(dp, deployed) == {}
    assert sent([*dp, "federation.report_client_metrics=true"], deployed) == numbers
    assert sent([*dp, "federation.report_client_metrics=true"], {**deployed, "report-metrics": "false"}) == {}
    assert sent(dp, simulated) == numbers
    assert sent(["privacy.federate_base_adapter=true"], deployed) == numbers
