"""Content-addressed artifacts streamed in chunks: only what a client lacks is sent, every file is
verified by sha256 before the artifact is cached (atomically), a corrupt artifact is refused with
a clear error and the previous cache is kept."""

import json
import os
import shutil

import pytest

from client.artifacts import ArtifactCache, ArtifactRejected
from coordinator.distribution import Artifact, Distributor, iter_chunks
from shared.protocol import KIND_BASE_ADAPTER, KIND_MODEL, ArtifactManifest, ChunkHeader


def _artifact(tmp_path, name="model", sizes=(5000, 10, 0, 123_457)):
    d = tmp_path / name
    (d / "sub").mkdir(parents=True)
    for i, n in enumerate(sizes):
        (d / ("sub" if i == 1 else ".") / f"f{i}.dat").write_bytes(os.urandom(n))
    return Artifact.from_dir(d, KIND_MODEL, identity="cafe" * 16)


def test_chunks_reassemble_into_a_verified_cached_artifact(tmp_path):
    art = _artifact(tmp_path)
    chunks = list(iter_chunks(art, 4096))
    assert len(chunks) > 3 and all(len(data) <= 4096 for _, data in chunks)
    assert sum(len(d) for _, d in chunks) == art.manifest.total_bytes
    cache = ArtifactCache(tmp_path / "cache")
    statuses = [cache.receive(h, d)["status"] for h, d in chunks]
    assert statuses[-1] == "complete" and set(statuses[:-1]) == {"partial"}
    assert cache.held() == [art.id]
    for rel in art.manifest.files:
        assert (cache.path(art.id) / rel).read_bytes() == (art.directory / rel).read_bytes()
    # The model hash adapters are bound to travels with the artifact.
    assert json.loads((cache.path(art.id) / "oppu_manifest.json").read_text())["model_hash"] == "cafe" * 16
    assert not list((tmp_path / "cache").glob(".partial-*"))
    # Receiving the same chunks again (another process sharing the cache) is harmless.
    assert cache.receive(*chunks[0])["status"] == "held"


def test_duplicate_chunks_are_skipped_and_gaps_refused(tmp_path):
    art = _artifact(tmp_path)
    chunks = list(iter_chunks(art, 4096))
    cache = ArtifactCache(tmp_path / "cache")
    cache.receive(*chunks[0])
    cache.receive(*chunks[0])  # a second node got the same chunk
    with pytest.raises(ArtifactRejected, match="discarded, the transfer must restart from the beginning"):
        cache.receive(*chunks[2])
    assert not list((tmp_path / "cache").glob(".partial-*"))
    for h, d in chunks:
        cache.receive(h, d)
    assert cache.held() == [art.id]


def test_corrupt_file_is_refused_and_the_previous_cache_kept(tmp_path):
    good = _artifact(tmp_path, "good", sizes=(100,))
    cache = ArtifactCache(tmp_path / "cache")
    for h, d in iter_chunks(good, 1 << 20):
        cache.receive(h, d)
    bad = _artifact(tmp_path, "bad", sizes=(3000, 5))
    chunks = list(iter_chunks(bad, 1 << 20))
    (header, data), = chunks
    tampered = bytes([data[0] ^ 0xFF]) + data[1:]
    with pytest.raises(ArtifactRejected, match="sha256 .* refused, the cache keeps its previous contents"):
        cache.receive(header, tampered)
    assert cache.held() == [good.id]
    assert (cache.path(good.id) / "f0.dat").read_bytes() == (good.directory / "f0.dat").read_bytes()


@pytest.mark.parametrize("mutate, message", [
    (lambda m: {**m, "id": "0" * 64}, "id is not the hash"),
    (lambda m: {**m, "files": {"../evil": "0" * 64}, "sizes": {"../evil": 1}}, "unsafe file path"),
])
def test_manifests_that_lie_are_refused(tmp_path, mutate, message):
    art = _artifact(tmp_path, sizes=(10,))
    (header, data), = list(iter_chunks(art, 1 << 20))
    forged = ChunkHeader(json.dumps(mutate(json.loads(header.manifest))), header.files, header.offsets, header.lengths)
    with pytest.raises(ValueError, match=message):
        ArtifactCache(tmp_path / "cache").receive(forged, data)


def test_only_missing_artifacts_are_streamed_and_bytes_logged(tmp_path, tiny_model_dir, caplog):
    """Through the real ClientApp (in-process grid): a node that holds the model gets only the
    adapter; a second ensure() sends nothing; a node whose cache refuses an artifact is reported."""
    import inprocess_federation as fedkit

    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run)
    _, names = fedkit.prepare(spec, run)
    model = Artifact.from_dir(tiny_model_dir, KIND_MODEL)
    adapter = _artifact(tmp_path, "adapter", sizes=(2048, 64))
    adapter = Artifact(ArtifactManifest(adapter.id, KIND_BASE_ADAPTER, adapter.manifest.files, adapter.manifest.sizes),
                       adapter.directory)
    # Two machines with their own caches; the first already holds the model.
    grid = fedkit.local_grid(spec, run, names[:2])
    (a, b) = grid.get_node_ids()
    grid._contexts[a].node_config["cache-dir"] = str(tmp_path / "cache-a")
    grid._contexts[b].node_config["cache-dir"] = str(tmp_path / "cache-b")
    pre = ArtifactCache(tmp_path / "cache-a")
    for h, d in iter_chunks(model, 1 << 22):
        pre.receive(h, d)
    dist = Distributor([model, adapter], chunk_bytes=1 << 22, timeout=60)
    with caplog.at_level("INFO", logger="oppu.distribution"):
        report = dist.ensure(grid, [a, b])
    assert not report.failed
    assert report.sent[a] == adapter.manifest.total_bytes
    assert report.sent[b] == model.manifest.total_bytes + adapter.manifest.total_bytes
    assert f"node {b}: sent {report.sent[b]} artifact bytes" in caplog.text
    assert set(ArtifactCache(tmp_path / "cache-b").held()) == {model.id, adapter.id}
    assert dist.ensure(grid, [a, b]).sent == {}  # known complete: nothing asked, nothing sent

    # A corrupted file on the coordinator's side: the client refuses, the run learns why.
    (adapter.directory / "f0.dat").write_bytes(b"x" * 2048)
    fresh = tmp_path / "cache-c"
    grid._contexts[b].node_config["cache-dir"] = str(fresh)
    shutil.copytree(tmp_path / "cache-b" / model.id, fresh / model.id)
    report = Distributor([model, adapter], chunk_bytes=1 << 22, timeout=60).ensure(grid, [b])
    assert "refused" in report.failed[b] and "sha256" in report.failed[b]
    assert ArtifactCache(fresh).held() == [model.id]


def test_quantized_export_is_written_whole_or_not_at_all(tmp_path, tiny_model_dir, monkeypatch):
    """The nf4 export clients download is swapped into the cache only once complete (shared.fileio
    .atomic_dir): a save that fails leaves no directory a later start would take as the export."""
    import transformers

    from coordinator.distribution import export_quantized_model
    from shared.config import BaseModelSpec
    from shared.model_manifest import MANIFEST

    spec = BaseModelSpec(path=str(tiny_model_dir), quantization="nf4", cache_dir=str(tmp_path / "cache"))
    real = transformers.PreTrainedModel.save_pretrained

    def half_then_fail(self, directory, *a, **kw):
        real(self, directory, *a, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", half_then_fail)
    assert export_quantized_model(spec) == tiny_model_dir  # clients quantize the source themselves
    quantized = tmp_path / "cache" / "quantized"
    assert not quantized.exists() or list(quantized.iterdir()) == []
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", real)
    out = export_quantized_model(spec)
    assert out.parent == quantized and (out / MANIFEST).is_file()
    assert json.loads((out / MANIFEST).read_text())["quantization"] == "nf4"
    assert [p.name for p in quantized.iterdir()] == [out.name]  # no temporary left beside it
