"""Bad input, everywhere it enters: LaMP and history files, history items, archive imports,
messages from a coordinator and updates the coordinator receives. Property-based (hypothesis,
bounded examples, no deadline): every input is either valid and accepted, or refused with the
module's own error type and a message naming where it is wrong. Each input goes on to what would
store it (a directory, a Chroma history store, an artifact cache, the updates a round aggregates)
and snapshots of that state are taken before and after it (tests/reliability/stored_state.py): the
figures count the refused inputs that changed it."""

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

import stored_state
from client import archive as arc
from client.artifacts import ArtifactCache, ArtifactRejected
from client.items import ItemError, parse_items
from shared.data.lamp import read_lamp
from shared.model_manifest import model_hash
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


class Tally(stored_state.Measured):
    """One area's figures; also remembers which tests fed it."""

    def __init__(self) -> None:
        super().__init__()
        self.tests: set[str] = set()
        self.unmeasured = 0

    def ok(self) -> None:
        self.accepted_input()
        self.tests.add(sys._getframe(1).f_code.co_name)

    def no_store_in_reach(self) -> None:
        """A refusal by a parser whose test has nothing that could store the input: counted, and
        the area's "changed stored state" is reported as not measured, never as 0."""
        self.tried += 1
        self.refused += 1
        self.unmeasured += 1
        self.tests.add(sys._getframe(1).f_code.co_name)

    def no(self, before, after) -> None:
        """A refused input, with the stored state it could have changed, snapshotted before and after."""
        changed = self.refused_input(before, after)
        self.tests.add(sys._getframe(1).f_code.co_name)
        assert not changed, f"a refused input changed what is stored: {changed}"


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
    before = stored_state.files(d)
    try:
        users = read_lamp(d, "dev", "LaMP-3")
    except ValueError as e:
        assert "dev_questions.json" in str(e) or "dev_outputs.json" in str(e), e
        TALLY["lamp"].no(before, stored_state.files(d))
    else:
        assert all(isinstance(h.fields.get("score"), str) for u in users for h in u.history)
        assert all(isinstance(u.profile_text, (str, type(None))) for u in users)
        TALLY["lamp"].ok()
        assert stored_state.files(d) == before  # a reader writes nothing, whatever it reads


@FUZZ
@given(data=st.binary(max_size=300))
def test_lamp_reader_refuses_bytes_that_are_not_json(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("lampb")
    (d / "dev_questions.json").write_bytes(data)
    before = stored_state.files(d)
    try:
        read_lamp(d, "dev", "LaMP-3")
    except ValueError as e:
        assert "dev_questions.json" in str(e), e
        TALLY["lamp"].no(before, stored_state.files(d))
    else:
        TALLY["lamp"].ok()


@FUZZ
@given(lines=st.lists(json_value, max_size=5), jsonl=st.booleans())
def test_history_file_reader_names_item_and_field(tmp_path_factory, lines, jsonl):
    from client.input_files import read_items

    f = tmp_path_factory.mktemp("hist") / "h.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) if jsonl else json.dumps(lines))
    before = stored_state.files(f.parent)
    try:
        items = read_items(str(f))
    except ValueError as e:
        assert str(f) in str(e), e
        TALLY["history-file"].no(before, stored_state.files(f.parent))
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
    from client.input_files import read_items

    f = tmp_path / "h.jsonl"
    f.write_text('{"description": "x", "tag": "comedy", "date": "2014-03-01"}\n')
    with pytest.raises(ValueError, match=r"item 0.*'id'"):
        read_items(str(f))  # an item without an id was stored as id "None" before
    f.write_text('{"id": 1, "description": "x", "tag": "comedy", "date": "2014-03-01"}\n')
    assert read_items(str(f))[0]["time"] == 1393632000  # an ISO date was silently time 0 before
    f.write_text('{"id": 1, "description": {"a": 1}, "tag": "comedy"}\n')
    with pytest.raises(ValueError, match=r"field 'description'.*must be text"):
        read_items(str(f))
    f.write_text('{"id": "a", "fields": {}}\n{"id": 2,\n')
    with pytest.raises(ValueError, match="line 2"):
        read_items(str(f))


# ---------------------------------------------------------------------------------- history items


@pytest.fixture(scope="module")
def history_store(tmp_path_factory):
    """A real Chroma history store (the daemon's, client/store.py): what accepted items are added to."""
    from client.store import ChromaHistoryStore

    store = ChromaHistoryStore(tmp_path_factory.mktemp("store") / "history", get_task("synthetic-tag").item_text)
    yield store
    store.close()


def _store_state(store) -> dict:
    return stored_state.history(store)


# Items close to valid as often as not (a task label, ids from a small pool), so batches reach the
# store and some re-use a stored id with other content: the store's own refusal is measured too.
NEAR_ITEM = st.fixed_dictionaries(
    {"id": st.one_of(st.sampled_from(["a", "b", "c"]), st.text(max_size=12)),
     "fields": st.one_of(
         st.fixed_dictionaries({"description": st.sampled_from(["a film", "another film"]),
                                "tag": st.sampled_from(["comedy", "drama", "sci-fi"])}),
         st.dictionaries(st.sampled_from(["description", "tag", "x y", ""]),
                         st.one_of(st.text(max_size=30), st.integers()), max_size=3))},
    optional={"time": st.one_of(st.integers(-5, 2**60), st.floats(), st.text(max_size=3))})


@FUZZ
@given(raw=st.lists(st.one_of(json_value, NEAR_ITEM), min_size=1, max_size=4))
@example(raw=[{"id": "a", "fields": {"description": "a film", "tag": "comedy"}, "time": 3}])
@example(raw=[{"id": "a", "fields": {"description": "another film", "tag": "comedy"}, "time": 3}])
def test_history_items_are_validated_with_a_location(history_store, raw):
    """Items go where POST /v1/history sends them: parse_items, then the Chroma store's add (which
    refuses a batch re-using a stored id with other content, before writing anything)."""
    task = get_task("synthetic-tag")
    before = _store_state(history_store)
    try:
        items = parse_items(raw, task, max_field_chars=200)
        history_store.add(items)
    except ItemError as e:
        assert e.loc[0] == "items" and isinstance(e.loc[1], int) and 0 <= e.loc[1] < len(raw), e.loc
        TALLY["history-items"].no(before, _store_state(history_store))
    except ValueError as e:  # an id already stored with other content
        assert "id" in str(e), e
        TALLY["history-items"].no(before, _store_state(history_store))
    else:
        for it in items:
            task.validate_item(it, "x")
            assert it.fields["tag"] in task.labels and it.time >= 0
            assert history_store.get([it.id])[0].fields == it.fields  # stored (now or by an earlier example)
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
    before = stored_state.files(d)
    try:
        a = arc.read_archive(path, work, max_bytes=limit, task="synthetic-tag")
    except arc.ArchiveError as e:
        assert str(e)
        TALLY["archive"].no(before, stored_state.files(d))  # nothing left behind in work/ or beside it
        assert list(work.iterdir()) == []
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


def _receive(cache: ArtifactCache, manifest_text: str, files: dict[str, bytes]) -> None:
    """What the ClientApp does with an artifact message: its manifest and every file, one chunk."""
    header = ChunkHeader(manifest_text, tuple(files), (0,) * len(files), tuple(len(v) for v in files.values()))
    cache.receive(header, b"".join(files.values()))


@FUZZ
@given(value=json_value, choice=st.integers(0, 40))
def test_artifact_manifest_parser_refuses_malformed(tmp_path_factory, value, choice):
    text, files = _manifest_json({"config.json": b"{}", "model.safetensors": b"abc"})
    mutated = json.dumps(_mutate(json.loads(text), choice, value))
    cache = ArtifactCache(tmp_path_factory.mktemp("cache"))
    before = stored_state.files(cache.root)
    try:
        m = ArtifactManifest.from_json(mutated)
    except ProtocolError as e:
        assert isinstance(e, ClientError) and str(e)
        with pytest.raises(ProtocolError):  # the cache, given it with the files, refuses it the same way
            _receive(cache, mutated, files)
        TALLY["artifact-manifest"].no(before, stored_state.files(cache.root))
    else:
        assert m.id == model_hash(m.files)
        TALLY["artifact-manifest"].ok()


def test_artifact_manifest_fixed_refusals(tmp_path):
    cache = ArtifactCache(tmp_path / "cache")
    good, _ = _manifest_json({"config.json": b"{}"})
    cases = []
    for files in ({"model.bin": b"x"}, {"weights.pt": b"x"}, {"../x": b"x"}, {".hidden": b"x"}, {"a/./b": b"x"},
                  {"a": b"x", "a/b": b"y"}, {"a\x00b": b"x"}):
        cases.append(_manifest_json(files))
    d = json.loads(good)
    for bad in ({**d, "kind": "anything"}, {**d, "sizes": {"config.json": -1}}, {**d, "extra": 1},
                {**d, "sizes": {"config.json": 1 << 50}}, {**d, "sizes": {"config.json": True}}):
        cases.append((json.dumps(bad), {"config.json": b"{}"}))
    cases.append(("x" * (2 << 20), {"config.json": b"{}"}))
    for text, files in cases:
        with pytest.raises(ProtocolError):
            ArtifactManifest.from_json(text)
        before = stored_state.files(cache.root)
        with pytest.raises(ProtocolError):
            _receive(cache, text, files)
        TALLY["artifact-manifest"].no(before, stored_state.files(cache.root))


CHUNKED = {"config.json": b'{"a": 1}', "model.safetensors": bytes(range(200)), "tok/vocab.json": b'{"x": 2}'}


def _intact_attempt():
    text, files = _manifest_json(CHUNKED)
    return text, files, [[rel, off, data[off:off + 64]] for rel, data in files.items() for off in range(0, len(data), 64)]


@st.composite
def chunk_attempts(draw):
    """A real 3-file artifact sent as chunks, some of them tampered with."""
    text, files, sends = _intact_attempt()
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


def cache_contract(files: dict[str, bytes], sends: list) -> tuple[list[bool], bool]:
    """What the cache must do with `sends`, from its contract (client/artifacts.py) replayed on
    plain bytes: a chunk for an unlisted file, outside the file, or starting past the bytes held
    is refused; bytes already held are skipped; a file that reaches its size is checked against
    its sha256 and, on a mismatch, dropped and refused; the artifact is held once every file is
    verified, and from then on every chunk of it is answered "held". Returns (refused per send,
    held at the end)."""
    got = {rel: b"" for rel in files}
    verified: set[str] = set()
    refused = []
    for rel, off, data in sends:
        if verified == set(files):
            refused.append(False)
            continue
        if rel not in files or off < 0 or off + len(data) > len(files[rel]) or off > len(got[rel]):
            refused.append(True)
            continue
        if off + len(data) > len(got[rel]):
            got[rel] += data[len(got[rel]) - off:]
        if len(got[rel]) == len(files[rel]) and rel not in verified:
            if hashlib.sha256(got[rel]).digest() != hashlib.sha256(files[rel]).digest():
                got[rel] = b""
                refused.append(True)
                continue
            verified.add(rel)
        refused.append(False)
    return refused, verified == set(files)


@FUZZ
@given(attempt=chunk_attempts())
@example(attempt=_intact_attempt())
def test_artifact_cache_never_holds_an_artifact_that_fails_its_hashes(tmp_path_factory, attempt):
    text, files, sends = attempt
    cache = ArtifactCache(tmp_path_factory.mktemp("cache"))
    m = ArtifactManifest.from_json(text)
    expected_refusals, expected_held = cache_contract(files, sends)
    refusals = []
    for rel, off, data in sends:
        before = stored_state.artifact_cache(cache)
        try:
            cache.receive(ChunkHeader(text, (rel,), (off,), (len(data),)), data)
        except (ArtifactRejected, ProtocolError) as e:
            assert m.id[:12] in str(e), e  # names the artifact
            refusals.append(True)
            TALLY["artifact-chunks"].no(before, stored_state.artifact_cache(cache))
        else:
            refusals.append(False)
            TALLY["artifact-chunks"].ok()
    assert refusals == expected_refusals, (sends, refusals, expected_refusals)
    assert cache.has(m.id) == expected_held
    assert cache.held() == ([m.id] if expected_held else [])
    # Whatever happened, the artifact sent again intact (as the coordinator does until it is held:
    # a first pass may meet tampered bytes still held and be refused when a file completes) ends
    # held, every file exactly its manifest's bytes.
    for _ in range(2):
        for rel, off, data in _intact_attempt()[2]:
            try:
                cache.receive(ChunkHeader(text, (rel,), (off,), (len(data),)), data)
            except ArtifactRejected:
                pass
    assert cache.held() == [m.id]
    for rel, digest in m.files.items():
        assert hashlib.sha256((cache.path(m.id) / rel).read_bytes()).hexdigest() == digest


def test_artifact_marker_collision_cannot_skip_a_hash_check(tmp_path):
    """'a/b' and 'a__b' used to share one '.a__b.ok' marker: verifying one skipped the other's check."""
    good = b"verified content"
    text, files = _manifest_json({"a/b": good, "a__b": good})
    cache = ArtifactCache(tmp_path / "cache")
    cache.receive(ChunkHeader(text, ("a/b",), (0,), (len(good),)), good)
    evil = b"tampered conten"  # same length, wrong hash
    before = stored_state.artifact_cache(cache)
    with pytest.raises(ArtifactRejected):
        cache.receive(ChunkHeader(text, ("a__b",), (0,), (len(evil) + 1,)), evil + b"!")
    assert cache.held() == []
    TALLY["artifact-chunks"].no(before, stored_state.artifact_cache(cache))


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
        TALLY["round-config"].no_store_in_reach()  # measured end to end: test_daemon_inputs.py (real ClientApp)
    else:
        assert all(math.isfinite(x) for x in (cfg.epsilon, cfg.delta, cfg.proximal_mu))
        assert isinstance(cfg.federate, bool) and len(cfg.model) == 64
        TALLY["round-config"].ok()


def chunk_header_is_valid(rec: dict) -> bool:
    """The chunk header's format (shared/protocol.py, ChunkHeader), stated on its own: exactly the
    keys manifest (text), files (list of text), offsets and lengths (lists of integers >= 0, not
    booleans), the three lists of one length."""
    if set(rec) != {"manifest", "files", "offsets", "lengths"}:
        return False
    lists = rec["files"], rec["offsets"], rec["lengths"]
    if not isinstance(rec["manifest"], str) or not all(isinstance(x, list) for x in lists):
        return False
    counts = [type(n) is int and n >= 0 for n in (*rec["offsets"], *rec["lengths"])]
    return all(isinstance(f, str) for f in rec["files"]) and all(counts) and len({len(x) for x in lists}) == 1


@st.composite
def chunk_headers(draw):
    """A real chunk header (one segment of a real artifact) with one node replaced by any JSON,
    a key dropped or added; or any dictionary over the header's keys."""
    text, files, sends = _intact_attempt()
    rel, off, data = sends[draw(st.integers(0, len(sends) - 1))]
    rec = {"manifest": text, "files": [rel], "offsets": [off], "lengths": [len(data)]}
    how = draw(st.sampled_from(["node", "node", "drop", "add", "any", "intact"]))
    if how == "node":  # any node but the record itself (a message's header is always a record)
        rec = _mutate(rec, draw(st.integers(1, 7)), draw(st.one_of(json_value, st.integers(-3, 3))))
    elif how == "drop":
        rec.pop(draw(st.sampled_from(sorted(rec))))
    elif how == "add":
        rec[draw(st.sampled_from(["other", "manifests", "Files"]))] = draw(json_value)
    elif how == "any":
        rec = draw(st.dictionaries(st.sampled_from(["manifest", "files", "offsets", "lengths", "other"]), json_value,
                                   max_size=5))
    return rec, files, data


@FUZZ
@given(case=chunk_headers())
@example(case=({"manifest": _intact_attempt()[0], "files": ["config.json"], "offsets": [0], "lengths": [8]},
               _intact_attempt()[1], CHUNKED["config.json"]))
@example(case=({"manifest": _intact_attempt()[0], "files": ["config.json"], "offsets": [True], "lengths": [8]},
               _intact_attempt()[1], CHUNKED["config.json"]))
def test_chunk_header_is_parsed_strictly(tmp_path_factory, case):
    """Every header is parsed by the client's parser (ChunkHeader.from_record, what the ClientApp's
    query.artifact handler runs first): refused exactly when it breaks the format, and a header
    that parses goes on into a real artifact cache with its bytes. Nothing stored changes for a
    refused one (the cache's files, snapshotted before and after)."""
    rec, files, data = case
    cache = ArtifactCache(tmp_path_factory.mktemp("cache"))
    before = stored_state.artifact_cache(cache)
    valid = chunk_header_is_valid(rec)
    try:
        header = ChunkHeader.from_record(rec)
    except ProtocolError as e:
        assert str(e).startswith("chunk header:"), e
        assert not valid, (rec, e)
        TALLY["chunk-header"].no(before, stored_state.artifact_cache(cache))
        return
    assert valid, rec
    assert (list(header.files), list(header.offsets), list(header.lengths)) == (rec["files"], rec["offsets"],
                                                                                rec["lengths"])
    payload = data if header.total == len(data) else bytes(min(header.total, 1 << 16))
    try:
        cache.receive(header, payload)
    except ClientError as e:  # a well-formed header whose content the cache refuses (its manifest, its ranges)
        assert str(e), e
        TALLY["chunk-header"].no(before, stored_state.artifact_cache(cache))
    else:
        assert all(f in files for f in rec["files"]), rec  # only the artifact's own files are written
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
    """Each update arrives in a round beside an honest one and goes through the coordinator's
    screen (coordinator.strategy.screen, what a round runs before aggregating): the stored state
    measured is what the round aggregates (each accepted update's node and tensor bytes), with
    the honest update alone before and with the tested one after."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from flwr.supercore.task_identity import TaskIdentity

    from coordinator.strategy import screen, validate_reply

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # set by Flower's runtime
    expected = {"a.lora_B.weight": (4, 2), "b.lora_A.weight": (4, 2)}
    honest = Message(RecordDict({"metrics": MetricRecord({"num-examples": 4}),
                                 "arrays": ArrayRecord({k: Array(np.ones(s, np.float32)) for k, s in expected.items()})}),
                     reply_to=Message(RecordDict(), dst_node_id=1, message_type="train"))

    def aggregated(replies) -> list:
        kept = screen(replies, expected, federate=True, dp=False).accepted
        return [(r.metadata.src_node_id, {k: hashlib.sha256(a.numpy().tobytes()).hexdigest()
                                          for k, a in r.content["arrays"].items()}) for r in kept]

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
    reply = Message(content, reply_to=sent)
    reason = validate_reply(reply, expected, federate=True)
    valid = (set(keys) == set(expected) and shape == (4, 2) and np.issubdtype(np.dtype(dtype), np.floating)
             and (poison is None or (poison == 1e30 and dtype != np.float16)) and not isinstance(n, bool)
             and math.isfinite(n) and n > 0 and not extra_metrics)
    before, after = aggregated([honest]), aggregated([honest, reply])
    if reason is None:
        assert valid, (keys, shape, dtype, poison, n)
        assert [node for node, _ in after] == [1, 5]
        TALLY["updates"].ok()
    else:
        assert not valid, reason
        TALLY["updates"].no(before, after)


# ---------------------------------------------------------------------------------- tallies -> figures

TALLY: dict[str, Tally] = {k: Tally() for k in ("lamp", "history-file", "history-items", "archive", "artifact-manifest",
                                                "artifact-chunks", "round-config", "chunk-header", "updates")}
HOW = {  # area: (where it enters, what was tried; snapshotted before and after each input)
    "lamp": ("LaMP reader (`shared/data/lamp.py`)", "hypothesis: one node of a valid file replaced by any JSON; "
             "random bytes; snapshot: the LaMP directory's files"),
    "history-file": ("history file reader (`oppu client add`)", "hypothesis: lists of any JSON, JSON and JSONL; "
                     "snapshot: the file's directory"),
    "history-items": ("history items (API and archive, `client/items.py`)", "hypothesis: item-shaped and arbitrary "
                      "JSON, parsed and added to a real Chroma store; snapshot: the store's items, records (document, "
                      "metadata, embedding) and profile"),
    "archive": ("archive import (`client/archive.py`)", "hypothesis: traversal, absolute, links, devices, fifos, "
                "duplicates, pickle members, wrong/mutated manifests, size limits; snapshot: the archive's directory "
                "and the unpack directory"),
    "artifact-manifest": ("artifact manifest from a coordinator", "hypothesis mutations + pickle formats, unsafe paths, "
                          "file/dir clash, huge/negative sizes, oversized text, each also sent with its files into a "
                          "real artifact cache; snapshot: every file of the cache"),
    "artifact-chunks": ("artifact chunks (hash mismatch)", "hypothesis: flipped, truncated, shifted, dropped, "
                        "duplicated, extended, unlisted chunks, each refusal and the held artifact checked against the "
                        "cache's contract replayed on plain bytes; snapshot: the artifacts the cache holds"),
    "round-config": ("round config in train/evaluate messages", "hypothesis: unknown keys, wrong types, NaN/inf, "
                     "unknown methods; parser only, no store in reach (measured end to end in the row \"round config in "
                     "train messages (real ClientApp ...)\")"),
    "chunk-header": ("chunk header of query.artifact", "hypothesis: a real header with one node replaced by any JSON, "
                     "a key dropped or added, any dictionary; refused exactly when it breaks the format, parsed "
                     "headers sent on into a real artifact cache; snapshot: the artifacts the cache holds"),
    "updates": ("updates the coordinator receives", "hypothesis: keys, shapes, dtypes, NaN/inf, example counts, "
                "records, each beside an honest update through the coordinator's screen; snapshot: the updates the "
                "round aggregates"),
}


def test_zz_record_bad_input_figures(figures):
    """Runs last in this file (alphabetical within the module order is not guaranteed; pytest keeps
    file order): turns the tallies into figures."""
    for key, t in TALLY.items():
        if t.tried:
            area, how = HOW[key]
            figures.test = "tests/reliability/test_bad_input.py::" + ", ".join(sorted(t.tests))
            figures.bad_inputs(area, tried=t.tried, refused=t.refused, accepted_valid=t.valid,
                               changed=None if t.unmeasured else t.changed, how=how)
    assert TALLY["archive"].refused > 0 and TALLY["lamp"].refused > 0
