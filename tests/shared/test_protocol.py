"""The wire protocol's typed payloads (shared/protocol.py): what one side writes the other reads back
unchanged, and what does not follow the protocol is refused with a ProtocolError naming the key,
before anything is used. tests/reliability/test_bad_input.py mutates whole messages at random; these
are the rules one at a time."""

import json

import pytest

from shared.model_manifest import model_hash
from shared.protocol import (
    KIND_BASE_ADAPTER, KIND_MODEL, MAX_ARTIFACT_FILES, MAX_MANIFEST_CHARS, ArtifactManifest, ChunkHeader, ClientError,
    ProtocolError, RoundConfig, is_lora_b, manifest_for_dir,
)

H = "a" * 64  # a sha256 hex digest


def _manifest(files: dict[str, str], kind: str = KIND_BASE_ADAPTER, **kw) -> ArtifactManifest:
    return ArtifactManifest(model_hash(files), kind, files, {rel: 10 for rel in files}, **kw)


def test_a_protocol_error_is_a_client_error_and_a_value_error():
    # A ClientError's text goes back to the coordinator as is; a ValueError is what callers catch.
    assert issubclass(ProtocolError, ClientError) and issubclass(ProtocolError, ValueError)


# ------------------------------------------------------------------------------- RoundConfig


def test_round_config_round_trips_through_a_record():
    cfg = RoundConfig(server_round=7, task="amazon-rating", model="1" * 64, base_adapter="2" * 64, federate=True,
                      ffa_lora=True, proximal_mu=0.01, methods="OPPU,RAG", epsilon=1.5, delta=1e-5)
    rec = cfg.to_record()
    assert rec["server-round"] == 7 and rec["proximal-mu"] == 0.01  # the names Flower's strategies use
    assert RoundConfig.from_record(rec) == cfg
    assert RoundConfig.from_record(rec).method_list == ["OPPU", "RAG"]
    # Defaults fill what an older coordinator leaves out; Flower's own keys pass through.
    minimal = {"oppu-server_round": 1, "oppu-task": "t", "oppu-model": H, "oppu-base_adapter": H, "flwr-key": 3}
    assert RoundConfig.from_record(minimal) == RoundConfig(1, "t", H, H)


@pytest.mark.parametrize("change, message", [
    ({"oppu-colour": "red"}, r"unknown keys \['oppu-colour'\]"),
    ({"oppu-model": None}, "model must be text"),
    ({"oppu-model": "abc"}, "model must be an artifact id"),
    ({"oppu-base_adapter": "A" * 64}, "base_adapter must be an artifact id"),
    ({"server-round": 1.5}, "server_round must be an integer"),
    ({"server-round": True}, "server_round must be an integer"),
    ({"server-round": -1}, r"server_round=-1 is outside \[0, "),
    ({"oppu-epsilon": float("nan")}, "epsilon=nan is outside"),
    ({"proximal-mu": float("inf")}, "proximal_mu=inf is outside"),
    ({"oppu-delta": 2.0}, r"delta=2.0 is outside \[0.0, 1.0\]"),
    ({"oppu-federate": 1}, "federate must be true or false"),
    ({"oppu-methods": "OPPU,telepathy"}, r"unknown methods \['telepathy'\]"),
    ({"oppu-task": "t" * 201}, "task name too long"),
])
def test_round_config_refuses_what_the_protocol_does_not_allow(change, message):
    rec = RoundConfig(server_round=1, task="t", model=H, base_adapter=H).to_record() | change
    with pytest.raises(ProtocolError, match=message):
        RoundConfig.from_record(rec)


def test_round_config_names_what_is_missing():
    with pytest.raises(ProtocolError, match="lacks model, base_adapter"):
        RoundConfig.from_record({"server-round": 1, "oppu-task": "t"})


# ------------------------------------------------------------------------------- ArtifactManifest


def test_artifact_manifest_round_trips_and_matches_the_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub" / "model.safetensors").write_bytes(b"\0" * 1000)
    m = manifest_for_dir(tmp_path, KIND_MODEL, identity="c" * 64)
    assert m.sizes == {"config.json": 2, "sub/model.safetensors": 1000} and m.total_bytes == 1002
    assert m.id == model_hash(m.files)
    assert ArtifactManifest.from_json(m.to_json()) == m
    (tmp_path / "config.json").write_text('{"changed": 1}')
    assert manifest_for_dir(tmp_path, KIND_MODEL).id != m.id  # content-addressed


@pytest.mark.parametrize("files, message", [
    ({"../escape.safetensors": H}, "unsafe file path '../escape.safetensors'"),
    ({"/abs.safetensors": H}, "unsafe file path"),
    ({".hidden": H}, "unsafe file path"),
    ({"a\\b.json": H}, "unsafe file path"),
    ({"weights.bin": H}, "pickle-based format"),
    ({"modeling_llama.py": H}, "is a code file"),
    ({"lib/native.so.1": H}, "is a code file"),
    ({"config.json": "not-a-digest"}, "has no sha256 hex digest"),
    ({"d": H, "d/config.json": H}, "both a file and a directory"),
    ({}, "0 files; 1 to"),
    ({f"f{i}.json": H for i in range(MAX_ARTIFACT_FILES + 1)}, f"{MAX_ARTIFACT_FILES + 1} files; 1 to"),
])
def test_artifact_manifest_refuses_unsafe_content(files, message):
    with pytest.raises(ProtocolError, match=message):
        ArtifactManifest.from_json(_manifest(files).to_json())


def test_artifact_manifest_refuses_a_wrong_id_kind_or_size():
    good = _manifest({"config.json": H})
    for field, value, message in [("id", "b" * 64, "id is not the hash of its file list"),
                                  ("id", "B" * 64, "64 lowercase hex digits"),
                                  ("kind", "script", "kind 'script' is not one of"),
                                  ("identity", "x", "identity must be a sha256"),
                                  ("sizes", {"config.json": -1}, "sizes must be >= 0"),
                                  ("sizes", {"other.json": 1}, "file and size lists differ"),
                                  ("sizes", {"config.json": 1 << 40}, "total at most")]:
        d = json.loads(good.to_json()) | {field: value}
        with pytest.raises(ProtocolError, match=message):
            ArtifactManifest.from_json(json.dumps(d))


@pytest.mark.parametrize("text", [
    "not json", "[]", json.dumps({"id": H}), json.dumps({"id": 1, "kind": "k", "files": {}, "sizes": {}}),
    json.dumps({"id": H, "kind": KIND_MODEL, "files": {"a": 1}, "sizes": {"a": 1}}),
    json.dumps({"id": H, "kind": KIND_MODEL, "files": {"a": H}, "sizes": {"a": True}}),
    json.dumps({"id": H, "kind": KIND_MODEL, "files": {}, "sizes": {}, "extra": 1}),
])
def test_an_unreadable_manifest_is_refused_by_type_only(text):
    with pytest.raises(ProtocolError, match=r"unreadable artifact manifest \(\w+\)"):
        ArtifactManifest.from_json(text)


def test_an_oversized_manifest_is_refused_before_it_is_parsed():
    text = _manifest({"config.json": H}).to_json()
    padded = text[:-1] + "," + '"pad": "' + "x" * MAX_MANIFEST_CHARS + '"}'
    with pytest.raises(ProtocolError, match=f"at most {MAX_MANIFEST_CHARS} characters"):
        ArtifactManifest.from_json(padded)
    with pytest.raises(ProtocolError, match="is not text"):
        ArtifactManifest.from_json(b"{}")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- ChunkHeader


def test_chunk_header_round_trips():
    h = ChunkHeader(manifest="{}", files=("a.json", "b.safetensors"), offsets=(0, 4096), lengths=(10, 2048))
    assert ChunkHeader.from_record(h.to_record()) == h
    assert h.total == 2058


@pytest.mark.parametrize("change, message", [
    ({"extra": 1}, r"unknown keys \['extra'\]"),
    ({"offsets": [0, -1]}, "non-negative integers"),
    ({"lengths": [1, True]}, "non-negative integers"),
    ({"files": ["a", 3]}, "files must be paths"),
    ({"lengths": [1]}, "differ in length"),
    ({"manifest": 5}, "manifest must be text"),
    ({"files": "a,b"}, "lists"),
])
def test_chunk_header_refuses_malformed_records(change, message):
    rec = {"manifest": "{}", "files": ["a", "b"], "offsets": [0, 0], "lengths": [1, 1]} | change
    with pytest.raises(ProtocolError, match=message):
        ChunkHeader.from_record(rec)
    rec.pop("manifest")
    with pytest.raises(ProtocolError, match="missing 'manifest'"):
        ChunkHeader.from_record({k: v for k, v in rec.items() if k != "extra"})


def test_only_lora_b_tensors_count_as_ffa_lora_exchange():
    assert is_lora_b("base_model.model.layers.0.self_attn.q_proj.lora_B.base.weight")
    assert is_lora_b("x.lora_B.weight")
    assert not is_lora_b("base_model.model.layers.0.self_attn.q_proj.lora_A.base.weight")
