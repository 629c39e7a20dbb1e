"""Content-addressed artifacts (the quantized base model, the initial base adapter) streamed to
clients in chunks inside Flower messages.

Flower's app bundle is capped at 10 MB, so weights never travel in it. Instead each client is
asked which artifact ids it holds (`query.inventory`) and is sent only the files of the artifacts
it lacks, in chunks (`query.artifact`); it verifies each file's sha256 and caches the artifact
atomically (client/artifacts.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from shared.config import BaseModelSpec
from shared.fileio import atomic_dir
from shared.model import load_base_model
from shared.model_manifest import MANIFEST, directory_manifest, model_hash, read_or_make_manifest
from shared.model_source import cache_root, resolve_model_dir
from shared.protocol import ARTIFACT, CHUNK, DATA, INVENTORY, REPLY, ArtifactManifest, ChunkHeader, manifest_for_dir

log = logging.getLogger("oppu.distribution")


@dataclass(frozen=True)
class Artifact:
    manifest: ArtifactManifest
    directory: Path

    @property
    def id(self) -> str:
        return self.manifest.id

    @classmethod
    def from_dir(cls, directory: Path, kind: str, identity: str = "") -> Artifact:
        return cls(manifest_for_dir(directory, kind, identity), Path(directory))


def export_quantized_model(spec: BaseModelSpec) -> Path:
    """The base model as clients will load it: quantized once here, saved, hashed, cached.

    A pre-quantized nf4 checkpoint of SmolLM2-135M is ~177 MB instead of 538 MB and loads in about
    a second instead of being quantized on every client. With quantization='none' the model
    directory itself is the artifact.
    """
    source = resolve_model_dir(spec)
    if spec.quantization == "none":
        return source
    src = read_or_make_manifest(source)
    root = cache_root(spec) / "quantized"
    target = root / f"{source.name[:40]}-{src['model_hash'][:12]}-{spec.quantization}"
    if (target / MANIFEST).exists():
        return target
    loaded = load_base_model(spec, quantize_embeddings=False)  # the only loader; it quantizes (saveably)
    if loaded.quantization != spec.quantization:
        log.warning("quantization %s was not applied (got %s); distributing the source checkpoint",
                    spec.quantization, loaded.quantization)
        return source
    def fill(tmp: Path) -> None:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        files = directory_manifest(tmp)
        # Adapters are bound to the source checkpoint's hash: the quantized export is the same base
        # model (load_base_model applies the same quantization to the source on load).
        (tmp / MANIFEST).write_text(json.dumps({
            "source": str(source), "quantization": spec.quantization, "files": files,
            "artifact_hash": model_hash(files), "model_hash": src["model_hash"],
        }, indent=2))

    try:
        atomic_dir(target, fill)  # a crash leaves no half-written export for the next start to trust
    except Exception as e:  # noqa: BLE001 - a quantized save is an optimisation, not a requirement
        log.warning("could not save the %s-quantized model (%s); clients will quantize the source themselves",
                    spec.quantization, e)
        return source
    log.info("quantized base model exported to %s", target)
    return target


def iter_chunks(artifact: Artifact, chunk_bytes: int) -> Iterator[tuple[ChunkHeader, bytes]]:
    """The artifact's files as messages of at most `chunk_bytes` (small files share one)."""
    text = artifact.manifest.to_json()
    files: list[str] = []
    offsets: list[int] = []
    lengths: list[int] = []
    buf = bytearray()
    for rel in sorted(artifact.manifest.files):
        size = artifact.manifest.sizes[rel]
        with open(artifact.directory / rel, "rb") as fh:
            offset = 0
            while True:
                data = fh.read(min(chunk_bytes - len(buf), size - offset)) if size - offset else b""
                files.append(rel)
                offsets.append(offset)
                lengths.append(len(data))
                buf += data
                offset += len(data)
                if len(buf) >= chunk_bytes:
                    yield ChunkHeader(text, tuple(files), tuple(offsets), tuple(lengths)), bytes(buf)
                    files, offsets, lengths, buf = [], [], [], bytearray()
                if offset >= size:
                    break
    if files:
        yield ChunkHeader(text, tuple(files), tuple(offsets), tuple(lengths)), bytes(buf)


@dataclass
class DistributionReport:
    sent: dict[int, int] = field(default_factory=dict)  # node -> artifact bytes sent
    failed: dict[int, str] = field(default_factory=dict)  # node -> reason

    def ok(self, nodes: Iterable[int]) -> list[int]:
        return [n for n in nodes if n not in self.failed]


class Distributor:
    """Sends each node the artifacts it lacks; remembers nodes known to hold everything.

    One node is served first; the others are asked again afterwards (virtual users of a
    simulation share one machine cache, so they usually hold everything by then) and the rest
    are served together, one message per chunk to all of them at once.
    """

    def __init__(self, artifacts: list[Artifact], *, chunk_bytes: int, timeout: float) -> None:
        self.artifacts = artifacts
        self.chunk_bytes = max(1, int(chunk_bytes))
        self.timeout = timeout
        self.complete: set[int] = set()
        self.bytes_total: dict[int, int] = {}

    def ensure(self, grid: Any, node_ids: Iterable[int]) -> DistributionReport:
        report = DistributionReport()
        todo = [n for n in node_ids if n not in self.complete]
        if not todo:
            return report
        held = self._inventory(grid, todo, report)
        lacking = [n for n in todo if n in held and self._lacking(held[n])]
        for n in todo:
            if n in held and n not in lacking:
                self._done(n, report, 0)
        if lacking:
            first, rest = lacking[:1], lacking[1:]
            self._serve(grid, first, held, report)
            if rest:
                held.update(self._inventory(grid, rest, report))
                for n in [n for n in rest if n in held and not self._lacking(held[n])]:
                    self._done(n, report, 0)
                self._serve(grid, [n for n in rest if n in held and self._lacking(held[n])], held, report)
        return report

    def _done(self, node: int, report: DistributionReport, sent: int) -> None:
        self.complete.add(node)
        report.sent[node] = sent
        self.bytes_total[node] = self.bytes_total.get(node, 0) + sent
        if sent:
            log.info("node %s: sent %d artifact bytes", node, sent)

    def _lacking(self, held: set[str]) -> list[Artifact]:
        return [a for a in self.artifacts if a.id not in held]

    def _inventory(self, grid: Any, nodes: list[int], report: DistributionReport) -> dict[int, set[str]]:
        from flwr.app import Message, RecordDict

        msgs = [Message(RecordDict(), dst_node_id=n, message_type=INVENTORY) for n in nodes]
        out: dict[int, set[str]] = {}
        for reply in grid.send_and_receive(msgs, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._fail(node, f"inventory: {reply.error.reason}", report)
                continue
            try:
                out[node] = {str(x) for x in reply.content[REPLY]["held"]}
            except (KeyError, TypeError):
                self._fail(node, "inventory: malformed reply", report)
        for n in nodes:
            if n not in out and n not in report.failed:
                self._fail(n, "inventory: no reply before the timeout", report)
        return out

    def _fail(self, node: int, reason: str, report: DistributionReport) -> None:
        report.failed[node] = reason
        log.warning("node %s: distribution failed: %s", node, reason)

    def _serve(self, grid: Any, nodes: list[int], held: dict[int, set[str]], report: DistributionReport) -> None:
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        sent = {n: 0 for n in nodes}
        for art in self.artifacts:
            active = [n for n in nodes if n not in report.failed and art.id not in held[n]]
            status = {n: "" for n in active}
            for header, data in iter_chunks(art, self.chunk_bytes):
                if not active:
                    break
                content = RecordDict({CHUNK: ConfigRecord(header.to_record()),
                                      DATA: ArrayRecord({"bytes": _as_array(data)})})
                msgs = [Message(content, dst_node_id=n, message_type=ARTIFACT) for n in active]
                answered = set()
                for reply in grid.send_and_receive(msgs, timeout=self.timeout):
                    n = reply.metadata.src_node_id
                    answered.add(n)
                    if reply.has_error():
                        self._fail(n, f"{art.manifest.kind} {art.id[:12]} refused: {reply.error.reason}", report)
                        continue
                    sent[n] += len(data)
                    status[n] = str(reply.content[REPLY]["status"])
                for n in active:
                    if n not in answered and n not in report.failed:
                        self._fail(n, f"no reply to a chunk of {art.manifest.kind} {art.id[:12]}", report)
                active = [n for n in active if n not in report.failed and status[n] != "held"]
            for n, st in status.items():
                if n not in report.failed and st not in ("complete", "held"):
                    self._fail(n, f"{art.manifest.kind} {art.id[:12]}: transfer ended with status {st!r}", report)
        for n in nodes:
            if n not in report.failed:
                self._done(n, report, sent[n])


def _as_array(data: bytes) -> Any:
    from flwr.app import Array

    return Array(np.frombuffer(data, dtype=np.uint8).copy())
