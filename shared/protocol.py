"""The federation's wire protocol: message types, record keys and the typed payloads both sides
build and parse. Flower's records carry flat scalars; everything else in the code is typed.

Messages from the coordinator (all replies are checked by tests/client/test_outbound_privacy.py):

| message type        | sent                                        | reply                                   |
|---------------------|---------------------------------------------|-----------------------------------------|
| query.inventory     | -                                           | artifact ids already in the client cache|
| query.artifact      | one chunk of one file of one artifact       | ack: bytes held, file/artifact verified |
| train               | global base adapter (arrays) + RoundConfig  | updated base adapter (only when the run |
|                     |                                             | federates it) + numbers                 |
| evaluate            | global base adapter (arrays) + RoundConfig  | metric numbers                          |

Artifacts (the quantized base model, the initial base adapter) are content-addressed: their id is
the sha256 of their sorted file-hash list (`shared.model.model_hash`), so "do you have it" is a set
membership test and a received artifact is verified file by file before it is used.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from .model import directory_manifest, model_hash

# Message types (Flower: "<category>.<action>").
INVENTORY = "query.inventory"
ARTIFACT = "query.artifact"
TRAIN = "train"
EVALUATE = "evaluate"

# Record keys.
ARRAYS = "arrays"  # ArrayRecord: the base adapter (Flower strategies' default key)
CONFIG = "config"  # ConfigRecord: RoundConfig (Flower strategies' default key)
METRICS = "metrics"  # MetricRecord: numbers only
CHUNK = "chunk"  # ConfigRecord: ChunkHeader
DATA = "data"  # ArrayRecord: {"bytes": uint8[...]} one chunk's payload
REPLY = "reply"  # ConfigRecord: small replies (inventory, ack)

NUM_EXAMPLES = "num-examples"
NUM_QUERIES = "num-queries"
AGG_WEIGHT = "agg-weight"  # set by the coordinator after validation (uniform under DP)

KIND_MODEL = "base-model"
KIND_BASE_ADAPTER = "base-adapter"


@dataclass(frozen=True)
class ArtifactManifest:
    """A content-addressed directory of files."""

    id: str
    kind: str
    files: dict[str, str]  # relative posix path -> sha256
    sizes: dict[str, int]
    # For a model: the hash adapters are bound to (the source checkpoint's, so a quantized export
    # and the checkpoint it came from are the same base model to every adapter manifest).
    identity: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArtifactManifest:
        try:
            d = json.loads(text)
            m = cls(str(d["id"]), str(d["kind"]), {str(k): str(v) for k, v in d["files"].items()},
                    {str(k): int(v) for k, v in d["sizes"].items()}, str(d.get("identity", "")))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"unreadable artifact manifest ({type(e).__name__})") from None
        m.check()
        return m

    def check(self) -> None:
        """The id must be the hash of the file list, and paths must stay inside the artifact."""
        if set(self.files) != set(self.sizes):
            raise ValueError(f"artifact {self.id[:12]}: file and size lists differ")
        for rel in self.files:
            p = PurePosixPath(rel)
            if p.is_absolute() or ".." in p.parts or not rel or rel.startswith("."):
                raise ValueError(f"artifact {self.id[:12]}: unsafe file path {rel!r}")
        if model_hash(self.files) != self.id:
            raise ValueError(f"artifact {self.id[:12]}: id is not the hash of its file list")


def manifest_for_dir(directory: Path, kind: str, identity: str = "") -> ArtifactManifest:
    """Hash every file of `directory` (the oppu_manifest.json cache file excluded)."""
    directory = Path(directory)
    files = directory_manifest(directory)
    sizes = {rel: (directory / rel).stat().st_size for rel in files}
    return ArtifactManifest(model_hash(files), kind, files, sizes, identity)


@dataclass(frozen=True)
class ChunkHeader:
    """Which bytes of which files one query.artifact message carries: segments of one artifact,
    packed up to the chunk size (small files share a message; a large file spans several)."""

    manifest: str  # ArtifactManifest.to_json() (small; sent with every chunk so any chunk is self-describing)
    files: tuple[str, ...]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    def to_record(self) -> dict[str, Any]:
        return {"manifest": self.manifest, "files": list(self.files), "offsets": list(self.offsets),
                "lengths": list(self.lengths)}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> ChunkHeader:
        h = cls(str(rec["manifest"]), tuple(str(f) for f in rec["files"]), tuple(int(o) for o in rec["offsets"]),
                tuple(int(n) for n in rec["lengths"]))
        if not len(h.files) == len(h.offsets) == len(h.lengths):
            raise ValueError("chunk header: files, offsets and lengths differ in length")
        return h

    @property
    def total(self) -> int:
        return sum(self.lengths)


@dataclass(frozen=True)
class RoundConfig:
    """What the coordinator tells a client for one train/evaluate message."""

    server_round: int
    task: str  # resolved task name (a synthetic fallback may differ from data.task)
    model: str  # artifact id of the base model to load
    base_adapter: str  # artifact id of the initial base adapter (FFA-LoRA's frozen A lives there)
    federate: bool = False  # train: return an updated base adapter
    ffa_lora: bool = False  # arrays carry only LoRA B matrices
    proximal_mu: float = 0.0
    methods: str = ""  # evaluate: comma-separated methods to score; train: personal methods to keep fresh
    epsilon: float = -1.0  # privacy spent after this round at `delta` (-1: no DP accounting)
    delta: float = 0.0

    def to_record(self) -> dict[str, Any]:
        # Flower's strategies add "server-round" and "proximal-mu" themselves under those names.
        out = {f"oppu-{f.name}": getattr(self, f.name) for f in fields(self)}
        out["server-round"] = self.server_round
        out["proximal-mu"] = self.proximal_mu
        return out

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> RoundConfig:
        kw: dict[str, Any] = {}
        for f in fields(cls):
            key = f"oppu-{f.name}"
            if key in rec:
                kw[f.name] = rec[key]
        if "server-round" in rec:
            kw["server_round"] = rec["server-round"]
        if "proximal-mu" in rec:
            kw["proximal_mu"] = rec["proximal-mu"]
        missing = [f.name for f in fields(cls) if f.name not in kw and f.default is MISSING]
        if missing:
            raise ValueError(f"round config lacks {', '.join(missing)}")
        return cls(
            server_round=int(kw["server_round"]), task=str(kw["task"]), model=str(kw["model"]),
            base_adapter=str(kw["base_adapter"]), federate=bool(kw.get("federate", False)),
            ffa_lora=bool(kw.get("ffa_lora", False)), proximal_mu=float(kw.get("proximal_mu", 0.0)),
            methods=str(kw.get("methods", "")), epsilon=float(kw.get("epsilon", -1.0)),
            delta=float(kw.get("delta", 0.0)),
        )

    @property
    def method_list(self) -> list[str]:
        return [m for m in self.methods.split(",") if m]


class ClientError(RuntimeError):
    """A client failure whose message is safe to send back (it never quotes user data).
    Any other exception is reported to the coordinator by its type only."""


def is_lora_b(key: str) -> bool:
    """FFA-LoRA exchanges only these (LoRA A stays frozen at its shared initial value)."""
    return ".lora_B." in key or key.endswith(".lora_B.weight")


__all__ = [
    "INVENTORY", "ARTIFACT", "TRAIN", "EVALUATE", "ARRAYS", "CONFIG", "METRICS", "CHUNK", "DATA", "REPLY",
    "NUM_EXAMPLES", "NUM_QUERIES", "AGG_WEIGHT", "KIND_MODEL", "KIND_BASE_ADAPTER", "ArtifactManifest",
    "manifest_for_dir", "ChunkHeader", "RoundConfig", "ClientError", "is_lora_b",
]
