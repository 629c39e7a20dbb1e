"""The client decides its own paths and limits: where artifacts are cached (the daemon's settings,
never the coordinator's run config), how much they may take (a quota enforced while receiving),
no partial download left behind, no model code run, no code file accepted in an artifact."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from client.artifacts import ArtifactCache, ArtifactRejected
from client.rounds import node_from
from client.settings import DEFAULT_ARTIFACT_QUOTA_MB, DaemonSpec
from client.supernode import supernode_command
from coordinator.distribution import Artifact, iter_chunks
from shared.config import load_federated, to_run_config
from shared.protocol import KIND_MODEL, ArtifactManifest, ClientError, ProtocolError


def _artifact(tmp_path: Path, name: str, files: dict[str, int]) -> Artifact:
    d = tmp_path / name
    for rel, n in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(os.urandom(n))
    return Artifact.from_dir(d, KIND_MODEL)


def _receive_all(cache: ArtifactCache, art: Artifact, chunk: int = 1 << 20) -> str:
    status = ""
    for header, data in iter_chunks(art, chunk):
        status = cache.receive(header, data)["status"]
    return status


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != ".lock") if root.is_dir() else []


# ----------------------------------------------------------------------------- paths


def test_a_deployed_client_ignores_cache_paths_in_the_run_config(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    elsewhere = tmp_path / "coordinator-chose-this"
    spec = load_federated(None, [f'federation.client_cache="{elsewhere}"', f'base_model.cache_dir="{elsewhere}"'])
    run_config = to_run_config(spec)

    node = node_from(run_config, {"data-dir": str(user)})
    assert node.cache.root == user / "artifacts"  # the client's default, inside its own directory
    own = tmp_path / "my-cache"
    node = node_from(run_config, {"data-dir": str(user), "cache-dir": str(own), "artifact-quota-mb": 2.5})
    assert node.cache.root == own and node.cache.quota_bytes == int(2.5 * 2**20)
    assert node_from(run_config, {"data-dir": str(user)}).cache.quota_bytes == int(DEFAULT_ARTIFACT_QUOTA_MB * 2**20)
    for bad in (0, -1, "10", True, float("nan"), float("inf")):
        with pytest.raises(ClientError, match="artifact-quota-mb"):
            node_from(run_config, {"data-dir": str(user), "artifact-quota-mb": bad})
    assert not elsewhere.exists()


def test_the_daemon_gives_its_supernode_its_own_cache_and_quota(tmp_path):
    spec = DaemonSpec(artifact_cache=str(tmp_path / "cache"), artifact_quota_mb=512)
    assert spec.artifact_root(tmp_path / "d") == tmp_path / "cache"
    assert DaemonSpec().artifact_root(tmp_path / "d") == tmp_path / "d" / "artifacts"
    cmd = supernode_command("flower-supernode", "127.0.0.1:9092", tmp_path, port=1, insecure=True,
                            cache_dir=spec.artifact_root(tmp_path), artifact_quota_mb=spec.artifact_quota_mb)
    node_config = cmd[cmd.index("--node-config") + 1]
    assert node_config == f"data-dir='{tmp_path.resolve()}' cache-dir='{(tmp_path / 'cache').resolve()}' " \
                          "artifact-quota-mb=512.0"
    from flwr.common.config import parse_config_args  # what the SuperNode makes of it

    assert parse_config_args([node_config]) == {"data-dir": str(tmp_path.resolve()),
                                                "cache-dir": str((tmp_path / "cache").resolve()),
                                                "artifact-quota-mb": 512.0}
    for bad, match in ((0, "artifact_quota_mb"), (float("nan"), "artifact_quota_mb")):
        with pytest.raises(ValueError, match=match):
            DaemonSpec(artifact_quota_mb=bad)
    with pytest.raises(ValueError, match="artifact_cache.*quote"):
        DaemonSpec(artifact_cache="/tmp/it's")


# ----------------------------------------------------------------------------- quota


def test_quota_refuses_an_artifact_that_would_not_fit_and_leaves_nothing(tmp_path):
    first = _artifact(tmp_path, "first", {"a.safetensors": 60_000})
    second = _artifact(tmp_path, "second", {"b.safetensors": 50_000, "c.json": 100})
    cache = ArtifactCache(tmp_path / "cache", quota_bytes=100_000)
    assert _receive_all(cache, first) == "complete"
    before = _leftovers(cache.root)
    used = cache.used_bytes()
    assert used > 60_000
    with pytest.raises(ArtifactRejected, match=rf"\(base-model, 50100 bytes\) does not fit this client's artifact "
                                               rf"quota: {used} bytes of 100000 bytes already in use; .*"
                                               r"daemon\.artifact_quota_mb.*nothing was written"):
        _receive_all(cache, second, chunk=8192)
    assert _leftovers(cache.root) == before and cache.held() == [first.id]
    exact = ArtifactCache(tmp_path / "cache", quota_bytes=used + second.manifest.total_bytes)  # fits exactly
    assert _receive_all(exact, second, chunk=8192) == "complete"


def test_quota_holds_while_two_downloads_interleave(tmp_path):
    """Every chunk is checked against what the other artifacts hold plus its own artifact's full
    size, so the cache never exceeds the quota, whatever order chunks arrive in."""
    big = _artifact(tmp_path, "big", {"w.safetensors": 80_000})
    other = _artifact(tmp_path, "other", {"v.safetensors": 30_000})
    cache = ArtifactCache(tmp_path / "cache", quota_bytes=100_000)
    chunks = list(iter_chunks(big, 8192))
    assert cache.receive(*chunks[0])["status"] == "partial"
    assert _receive_all(cache, other) == "complete"  # fits beside big's 8 KB so far
    with pytest.raises(ArtifactRejected, match="quota"):
        cache.receive(*chunks[1])  # big would now overflow: refused, its partial download removed
    assert cache.held() == [other.id] and _leftovers(cache.root) == [other.id]
    assert cache.used_bytes() <= 100_000


# ----------------------------------------------------------------------------- partial downloads


def test_a_refused_transfer_leaves_no_partial_download(tmp_path):
    art = _artifact(tmp_path, "art", {"x.safetensors": 20_000, "y.json": 10})
    cache = ArtifactCache(tmp_path / "cache")
    chunks = list(iter_chunks(art, 4096))
    assert cache.receive(*chunks[0])["status"] == "partial"
    assert any(n.startswith(".partial-") for n in _leftovers(cache.root))
    with pytest.raises(ArtifactRejected, match="partial download was discarded"):
        cache.receive(*chunks[2])  # a gap
    assert _leftovers(cache.root) == []
    for header, data in chunks[:-1]:
        cache.receive(header, data)
    header, data = chunks[-1]
    with pytest.raises(ArtifactRejected, match="sha256"):
        cache.receive(header, bytes([data[0] ^ 1]) + data[1:])  # the last file's bytes do not match
    assert _leftovers(cache.root) == []


def test_a_write_error_leaves_no_partial_download(tmp_path, monkeypatch):
    art = _artifact(tmp_path, "art", {"x.safetensors": 20_000})
    cache = ArtifactCache(tmp_path / "cache")
    chunks = list(iter_chunks(art, 4096))
    cache.receive(*chunks[0])

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        cache.receive(*chunks[1])
    assert _leftovers(cache.root) == []


def test_the_daemon_removes_partial_downloads_when_it_starts(tiny_engine, tmp_path):
    from client.service import ClientService

    data = tmp_path / "d"
    art = _artifact(tmp_path, "art", {"x.safetensors": 20_000})
    complete = _artifact(tmp_path, "done", {"z.safetensors": 100})
    cache = ArtifactCache(data / "artifacts")
    cache.receive(*next(iter_chunks(art, 4096)))
    _receive_all(cache, complete)
    assert any(n.startswith(".partial-") for n in _leftovers(cache.root))
    svc = ClientService(DaemonSpec(task="synthetic-tag"), data, engine=tiny_engine)
    try:
        assert _leftovers(cache.root) == [complete.id]  # the complete artifact stays
    finally:
        svc.close()


# ----------------------------------------------------------------------------- no code


@pytest.mark.parametrize("name", ["modeling_evil.py", "sub/tok.pyc", "__pycache__/m.cpython-311.pyc", "lib/x.so",
                                  "lib/libx.so.1.2", "run.sh", "EVIL.PY", "x.dylib", "y.dll", "nb.ipynb"])
def test_code_files_in_an_artifact_are_refused_before_a_byte_is_written(tmp_path, name):
    art = _artifact(tmp_path, "art", {"model.safetensors": 100, "config.json": 10, name: 20})
    cache = ArtifactCache(tmp_path / "cache")
    with pytest.raises(ProtocolError, match="is a code file"):
        _receive_all(cache, art)
    assert _leftovers(cache.root) == []


def test_weights_configuration_and_tokenizer_files_are_accepted(tmp_path):
    files = {"model.safetensors": 100, "config.json": 10, "generation_config.json": 10, "tokenizer.json": 10,
             "tokenizer_config.json": 10, "special_tokens_map.json": 10, "merges.txt": 10, "vocab.json": 10,
             "tokenizer.model": 10, "adapter_model.safetensors": 10, "adapter_config.json": 10, "README.md": 5,
             "sub/spy.json": 3, "pyproject.toml.txt": 3}
    art = _artifact(tmp_path, "art", files)
    ArtifactManifest.from_json(art.manifest.to_json())
    assert _receive_all(ArtifactCache(tmp_path / "cache"), art) == "complete"


def test_model_code_never_runs_even_when_asked_yes(tiny_model_dir, tmp_path, monkeypatch):
    """A model directory whose config points at Python it ships (auto_map): transformers, left to its
    default, asks on stdin whether to run it. The loader says no before anyone is asked."""
    from shared.config import BaseModelSpec
    from shared.model import load_base_model

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    ran = tmp_path / "the-code-ran"
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="oppu-evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                                    "AutoModelForCausalLM": "evil.EvilModel"})
    (d / "config.json").write_text(json.dumps(config))
    (d / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'oppu-evil'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_base_model(BaseModelSpec(path=str(d), quantization="none"))
    assert not ran.exists() and not asked
