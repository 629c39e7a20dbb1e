"""Bad input, everywhere it enters: LaMP and history files, history items, archive imports,
messages from a coordinator and updates the coordinator receives. Property-based (hypothesis,
bounded examples, no deadline): every input is either valid and accepted, or refused with the
module's own error type and a message naming where it is wrong; nothing stored changes."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from client import archive as arc
from client.artifacts import ArtifactCache, ArtifactRejected
from client.items import ItemError, parse_items
from shared.data.lamp import read_lamp
from shared.model import model_hash
from shared.protocol import (KIND_BASE_ADAPTER, KIND_MODEL, ArtifactManifest, ChunkHeader, ClientError,
                             ProtocolError, RoundConfig)
from shared.tasks import get_task

FUZZ = settings(max_examples=int(os.environ.get("OPPU_FUZZ_EXAMPLES", "60")), deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck), database=None)

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=20))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)


class Tally:
    def __init__(self) -> None:
        self.tried = self.refused = self.valid = 0
        self.tests: set[str] = set()

    def ok(self) -> None:
        self.tried += 1
        self.valid += 1
        self.tests.add(sys._getframe(1).f_code.co_name)

    def no(self) -> None:
        self.tried += 1
        self.refused += 1
        self.tests.add(sys._getframe(1).f_code.co_name)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its sha256 (what 'nothing stored changed' is checked against)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------------- LaMP files

LAMP_ITEM = {"text": "fine strings", "score": "4", "id": "p1", "date": "2014-03-01"}


def _mutate(base, path_choice, value):
    """Replace one node of a JSON structure (chosen by index) by `value`."""
    nodes = []

    def walk(obj, parent, key):
        nodes.append((parent, key))
        if isinstance(obj, dict):
            for k in list(obj):
                walk(obj[k], obj, k)
        elif isinstance(obj, list):
            for i in range(len(obj)):
                walk(obj[i], obj, i)

    walk(base, None, None)
    parent, key = nodes[path_choice % len(nodes)]
    if parent is None:
        return value
    parent[key] = value
    return base


@FUZZ
@given(choice=st.integers(0, 200), value=json_value, outputs=st.booleans())
def test_lamp_reader_refuses_malformed_files_naming_the_file(tmp_path_factory, choice, value, outputs):
    d = tmp_path_factory.mktemp("lamp")
    questions = [{"id": "310", "input": "What is the score of this review? review: Works.",
                  "profile": [dict(LAMP_ITEM), {**LAMP_ITEM, "id": "p2", "score": "2"}]}]
    golds = {"task": "LaMP_3", "golds": [{"id": "310", "output": "4"}]}
    if outputs:
        golds = _mutate(golds, choice, value)
    else:
        questions = _mutate(questions, choice, value)
    (d / "dev_questions.json").write_text(json.dumps(questions))
    (d / "dev_outputs.json").write_text(json.dumps(golds))
    before = snapshot(d)
    try:
        users = read_lamp(d, "dev", "LaMP-3")
    except ValueError as e:
        assert "dev_questions.json" in str(e) or "dev_outputs.json" in str(e), e
        TALLY["lamp"].no()
    else:
        assert all(isinstance(h.fields.get("score"), str) for u in users for h in u.history)
        assert all(isinstance(u.profile_text, (str, type(None))) for u in users)
        TALLY["lamp"].ok()
    assert snapshot(d) == before


@FUZZ
@given(data=st.binary(max_size=300))
def test_lamp_reader_refuses_bytes_that_are_not_json(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("lampb")
    (d / "dev_questions.json").write_bytes(data)
    try:
        read_lamp(d, "dev", "LaMP-3")
    except ValueError as e:
        assert "dev_questions.json" in str(e), e
        TALLY["lamp"].no()
    else:
        TALLY["lamp"].ok()


@FUZZ
@given(lines=st.lists(json_value, max_size=5), jsonl=st.booleans())
def test_history_file_reader_names_item_and_field(tmp_path_factory, lines, jsonl):
    from client.cli import read_items

    f = tmp_path_factory.mktemp("hist") / "h.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) if jsonl else json.dumps(lines))
    try:
        items = read_items(str(f))
    except ValueError as e:
        assert str(f) in str(e), e
        TALLY["history-file"].no()
        return
    assert all(isinstance(it, dict) and isinstance(it.get("fields"), (dict, type(None))) or "fields" in it
               for it in items)
    TALLY["history-file"].ok()
    # What the reader produced then goes through the daemon's one validation path.
    try:
        parse_items(items, get_task("synthetic-tag"), max_field_chars=1000)
    except ItemError as e:
        assert e.loc and e.loc[0] == "items"


def test_history_file_reader_fixed_cases(tmp_path):
    from client.cli import read_items

    f = tmp_path / "h.jsonl"
    f.write_text('{"description": "x", "tag": "comedy", "date": "2014-03-01"}\n')
    with pytest.raises(ValueError, match=r"item 0.*'id'"):
        read_items(str(f))  # an item without an id was stored as id "None" before
    f.write_text('{"id": 1, "description": "x", "tag": "comedy", "date": "2014-03-01"}\n')
    assert read_items(str(f))[0]["time"] == 1393632000  # an ISO date was silently time 0 before
    f.write_text('{"id": 1, "description": {"a": 1}, "tag": "comedy"}\n')
    with pytest.raises(ValueError, match="'description' must be text"):
        read_items(str(f))
    f.write_text('{"id": "a", "fields": {}}\n{"id": 2,\n')
    with pytest.raises(ValueError, match="line 2"):
        read_items(str(f))


# ---------------------------------------------------------------------------------- history items


@FUZZ
@given(raw=st.lists(st.one_of(json_value, st.fixed_dictionaries(
    {"id": st.text(max_size=12), "fields": st.dictionaries(st.sampled_from(["description", "tag", "x y", ""]),
                                                           st.one_of(st.text(max_size=30), st.integers()), max_size=3)},
    optional={"time": st.one_of(st.integers(-5, 2**60), st.floats(), st.text(max_size=3))})), min_size=1, max_size=4))
@example(raw=[{"id": "a", "fields": {"description": "a film", "tag": "comedy"}, "time": 3}])
def test_history_items_are_validated_with_a_location(raw):
    task = get_task("synthetic-tag")
    try:
        items = parse_items(raw, task, max_field_chars=200)
    except ItemError as e:
        assert e.loc[0] == "items" and isinstance(e.loc[1], int) and 0 <= e.loc[1] < len(raw), e.loc
        TALLY["history-items"].no()
    else:
        for it in items:
            task.validate_item(it, "x")
            assert it.fields["tag"] in task.labels and it.time >= 0
        TALLY["history-items"].ok()


# ---------------------------------------------------------------------------------- archives

HIST = json.dumps({"id": "a", "fields": {"description": "x", "tag": "comedy"}, "time": 0}).encode() + b"\n"
MEMBER_NAMES = ["oppu-export.json", "history.jsonl", "profile.json", "personal/adapter_config.json",
                "personal/adapter_model.safetensors", "personal/oppu_adapter.json", "personal/README.md",
                "personal/adapter_model.bin", "../evil", "/etc/evil", "personal/../../evil", "a\\b", "personal",
                "history.jsonl/../history.jsonl", "./history.jsonl", "x" * 200]


@st.composite
def archives(draw):
    members = []
    files = {"history.jsonl": HIST}
    manifest = {"format": "oppu-export", "format_version": 1, "task": "synthetic-tag", "base_model_hash": "h",
                "history_items": 1}
    manifest = _mutate(manifest, draw(st.integers(0, 30)), draw(json_value)) if draw(st.booleans()) else manifest
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(MEMBER_NAMES))
        kind = draw(st.sampled_from(["file", "file", "symlink", "hardlink", "dir", "fifo", "chr"]))
        data = draw(st.binary(max_size=64)) if draw(st.booleans()) else HIST
        members.append((name, kind, data))
        if kind == "file" and draw(st.booleans()):
            files[name] = data
    if isinstance(manifest, dict) and draw(st.booleans()):
        manifest["files"] = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    order = [("oppu-export.json", "file", json.dumps(manifest).encode()), ("history.jsonl", "file", HIST)] + members
    return order, draw(st.integers(100, 1 << 16))


def _write_tar(path: Path, members) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE,
                         "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}[kind]
            info.linkname = "/etc/passwd"
            tar.addfile(info)


@FUZZ
@given(case=archives())
def test_archive_reader_refuses_hostile_archives(tmp_path_factory, case):
    members, limit = case
    d = tmp_path_factory.mktemp("arc")
    path = d / "in.tar.gz"
    _write_tar(path, members)
    work = d / "work"
    try:
        a = arc.read_archive(path, work, max_bytes=limit, task="synthetic-tag")
    except arc.ArchiveError as e:
        assert str(e)
        TALLY["archive"].no()
        assert list(work.iterdir()) == []  # nothing left behind
    else:
        # Accepted: only allowed members, each verified, all inside the private directory.
        assert a.directory.resolve().is_relative_to(work.resolve())
        assert all(p.resolve().is_relative_to(a.directory.resolve()) for p in a.directory.rglob("*"))
        assert not any(p.is_symlink() for p in a.directory.rglob("*"))
        a.cleanup()
        TALLY["archive"].ok()
    assert not (d.parent / "evil").exists() and not (d / "evil").exists()


# ---------------------------------------------------------------------------------- coordinator messages


def _manifest_json(files: dict[str, bytes], kind: str = KIND_MODEL) -> tuple[str, dict[str, bytes]]:
    hashes = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    m = ArtifactManifest(model_hash(hashes), kind, hashes, {k: len(v) for k, v in files.items()})
    return m.to_json(), files


@FUZZ
@given(value=json_value, choice=st.integers(0, 40))
def test_artifact_manifest_parser_refuses_malformed(value, choice):
    text, _ = _manifest_json({"config.json": b"{}", "model.safetensors": b"abc"})
    mutated = _mutate(json.loads(text), choice, value)
    try:
        m = ArtifactManifest.from_json(json.dumps(mutated))
    except ProtocolError as e:
        assert isinstance(e, ClientError) and str(e)
        TALLY["artifact-manifest"].no()
    else:
        assert m.id == model_hash(m.files)
        TALLY["artifact-manifest"].ok()


def test_artifact_manifest_fixed_refusals():
    good, _ = _manifest_json({"config.json": b"{}"})
    for files in ({"model.bin": b"x"}, {"weights.pt": b"x"}, {"../x": b"x"}, {".hidden": b"x"}, {"a/./b": b"x"},
                  {"a": b"x", "a/b": b"y"}, {"a\x00b": b"x"}):
        text, _ = _manifest_json(files)
        with pytest.raises(ProtocolError):
            ArtifactManifest.from_json(text)
        TALLY["artifact-manifest"].no()
    d = json.loads(good)
    for bad in ({**d, "kind": "anything"}, {**d, "sizes": {"config.json": -1}}, {**d, "extra": 1},
                {**d, "sizes": {"config.json": 1 << 50}}, {**d, "sizes": {"config.json": True}}):
        with pytest.raises(ProtocolError):
            ArtifactManifest.from_json(json.dumps(bad))
        TALLY["artifact-manifest"].no()
    with pytest.raises(ProtocolError):
        ArtifactManifest.from_json("x" * (2 << 20))
    TALLY["artifact-manifest"].no()


@st.composite
def chunk_attempts(draw):
    """A real 3-file artifact sent as chunks, some of them tampered with."""
    files = {"config.json": b'{"a": 1}', "model.safetensors": bytes(range(200)), "tok/vocab.json": b'{"x": 2}'}
    text, files = _manifest_json(files)
    sends = []
    for rel, data in files.items():
        for off in range(0, len(data), 64):
            sends.append([rel, off, data[off:off + 64]])
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(sends) - 1))
        how = draw(st.sampled_from(["flip", "truncate", "offset", "drop", "dup", "other-file", "extra"]))
        rel, off, data = sends[i]
        if how == "flip" and data:
            j = draw(st.integers(0, len(data) - 1))
            sends[i] = [rel, off, data[:j] + bytes([data[j] ^ 0xFF]) + data[j + 1:]]
        elif how == "truncate":
            sends[i] = [rel, off, data[: len(data) // 2]]
        elif how == "offset":
            sends[i] = [rel, off + draw(st.integers(-5, 70)), data]
        elif how == "drop":
            sends.pop(i)
        elif how == "dup":
            sends.insert(i, list(sends[i]))
        elif how == "other-file":
            sends[i] = ["not-listed.json", off, data]
        elif how == "extra":
            sends[i] = [rel, off, data + b"!"]
    return text, files, sends


@FUZZ
@given(attempt=chunk_attempts())
def test_artifact_cache_never_holds_an_artifact_that_fails_its_hashes(tmp_path_factory, attempt):
    text, files, sends = attempt
    cache = ArtifactCache(tmp_path_factory.mktemp("cache"))
    refused = False
    for rel, off, data in sends:
        try:
            cache.receive(ChunkHeader(text, (rel,), (off,), (len(data),)), data)
        except (ArtifactRejected, ProtocolError):
            refused = True
    m = ArtifactManifest.from_json(text)
    if cache.has(m.id):
        for rel, digest in m.files.items():
            assert hashlib.sha256((cache.path(m.id) / rel).read_bytes()).hexdigest() == digest
        TALLY["artifact-chunks"].ok() if not refused else TALLY["artifact-chunks"].no()
    else:
        TALLY["artifact-chunks"].no()


def test_artifact_marker_collision_cannot_skip_a_hash_check(tmp_path):
    """'a/b' and 'a__b' used to share one '.a__b.ok' marker: verifying one skipped the other's check."""
    good = b"verified content"
    text, files = _manifest_json({"a/b": good, "a__b": good})
    cache = ArtifactCache(tmp_path / "cache")
    cache.receive(ChunkHeader(text, ("a/b",), (0,), (len(good),)), good)
    evil = b"tampered conten"  # same length, wrong hash
    with pytest.raises(ArtifactRejected):
        cache.receive(ChunkHeader(text, ("a__b",), (0,), (len(evil) + 1,)), evil + b"!")
    assert cache.held() == []
    TALLY["artifact-chunks"].no()


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["oppu-server_round", "oppu-task", "oppu-model", "oppu-base_adapter",
                                                "oppu-federate", "oppu-ffa_lora", "oppu-proximal_mu", "oppu-methods",
                                                "oppu-epsilon", "oppu-delta", "oppu-colour", "server-round",
                                                "proximal-mu", "clipping_norm"]),
                               st.one_of(json_scalar, st.just(float("nan")), st.just(float("inf")),
                                         st.sampled_from(["OPPU,RAG", "OPPU,teleport", "0" * 64])), max_size=3))
def test_round_config_is_parsed_strictly(changes):
    good = RoundConfig(server_round=2, task="synthetic-tag", model="a" * 64, base_adapter="b" * 64, federate=True,
                       methods="OPPU,RAG", epsilon=1.5, delta=1e-5).to_record()
    rec = {**good, **changes}
    try:
        cfg = RoundConfig.from_record(rec)
    except ProtocolError as e:
        assert str(e).startswith("round config")
        TALLY["round-config"].no()
    else:
        assert all(math.isfinite(x) for x in (cfg.epsilon, cfg.delta, cfg.proximal_mu))
        assert isinstance(cfg.federate, bool) and len(cfg.model) == 64
        TALLY["round-config"].ok()


@FUZZ
@given(rec=st.dictionaries(st.sampled_from(["manifest", "files", "offsets", "lengths", "other"]), json_value, max_size=5))
def test_chunk_header_is_parsed_strictly(rec):
    try:
        ChunkHeader.from_record(rec)
    except ProtocolError:
        TALLY["chunk-header"].no()
    else:
        TALLY["chunk-header"].ok()


# ---------------------------------------------------------------------------------- updates to the coordinator


@FUZZ
@given(keys=st.lists(st.sampled_from(["a.lora_B.weight", "b.lora_A.weight", "x"]), max_size=3, unique=True),
       shape=st.sampled_from([(4, 2), (2, 4), (4,), (4, 2, 1)]),
       dtype=st.sampled_from([np.float32, np.float64, np.int32, np.float16]),
       poison=st.sampled_from([None, np.nan, np.inf, -np.inf, 1e30]),
       n=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 10)),
       extra_metrics=st.booleans())
@example(keys=["a.lora_B.weight", "b.lora_A.weight"], shape=(4, 2), dtype=np.float32, poison=None, n=3, extra_metrics=False)
@example(keys=["a.lora_B.weight", "b.lora_A.weight"], shape=(4, 2), dtype=np.float64, poison=1e30, n=1.5,
         extra_metrics=False)
def test_coordinator_validates_every_update(keys, shape, dtype, poison, n, extra_metrics):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from flwr.supercore.task_identity import TaskIdentity

    from coordinator.strategy import validate_reply

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # set by Flower's runtime
    expected = {"a.lora_B.weight": (4, 2), "b.lora_A.weight": (4, 2)}
    sent = Message(RecordDict(), dst_node_id=5, message_type="train")
    arrays = {}
    for k in keys:
        v = np.zeros(shape, dtype)
        if poison is not None and np.issubdtype(v.dtype, np.floating):
            with np.errstate(over="ignore"):  # a huge poison overflows float16/32 to inf: also a bad update
                v.flat[0] = poison
        arrays[k] = v
    content = RecordDict({"metrics": MetricRecord({"num-examples": n})})
    if extra_metrics:
        content["metrics2"] = MetricRecord({"x": 1.0})
    content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    reason = validate_reply(Message(content, reply_to=sent), expected, federate=True)
    valid = (set(keys) == set(expected) and shape == (4, 2) and np.issubdtype(np.dtype(dtype), np.floating)
             and (poison is None or (poison == 1e30 and dtype != np.float16)) and not isinstance(n, bool)
             and math.isfinite(n) and n > 0 and not extra_metrics)
    if reason is None:
        assert valid, (keys, shape, dtype, poison, n)
        TALLY["updates"].ok()
    else:
        assert not valid, reason
        TALLY["updates"].no()


# ---------------------------------------------------------------------------------- tallies -> figures

TALLY: dict[str, Tally] = {k: Tally() for k in ("lamp", "history-file", "history-items", "archive", "artifact-manifest",
                                                "artifact-chunks", "round-config", "chunk-header", "updates")}
HOW = {
    "lamp": ("LaMP reader (`shared/data/lamp.py`)", "hypothesis: one node of a valid file replaced by any JSON; random bytes"),
    "history-file": ("history file reader (`oppu client add`)", "hypothesis: lists of any JSON, JSON and JSONL"),
    "history-items": ("history items (API and archive, `client/items.py`)", "hypothesis: item-shaped and arbitrary JSON"),
    "archive": ("archive import (`client/archive.py`)", "hypothesis: traversal, absolute, links, devices, fifos, "
                "duplicates, pickle members, wrong/mutated manifests, size limits"),
    "artifact-manifest": ("artifact manifest from a coordinator", "hypothesis mutations + pickle formats, unsafe paths, "
                          "file/dir clash, huge/negative sizes, oversized text"),
    "artifact-chunks": ("artifact chunks (hash mismatch)", "hypothesis: flipped, truncated, shifted, dropped, "
                        "duplicated, extended, unlisted chunks; invariant: a held artifact always matches its hashes"),
    "round-config": ("round config in train/evaluate messages", "hypothesis: unknown keys, wrong types, NaN/inf, "
                     "unknown methods"),
    "chunk-header": ("chunk header of query.artifact", "hypothesis: any JSON per key"),
    "updates": ("updates the coordinator receives", "hypothesis: keys, shapes, dtypes, NaN/inf, example counts, records"),
}


def test_zz_record_bad_input_figures(figures):
    """Runs last in this file (alphabetical within the module order is not guaranteed; pytest keeps
    file order): turns the tallies into figures."""
    for key, t in TALLY.items():
        if t.tried:
            area, how = HOW[key]
            figures.test = "tests/reliability/test_bad_input.py::" + ", ".join(sorted(t.tests))
            figures.bad_inputs(area, tried=t.tried, refused=t.refused, accepted_valid=t.valid, how=how)
    assert TALLY["archive"].refused > 0 and TALLY["lamp"].refused > 0
