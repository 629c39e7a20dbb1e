"""The federation's wire protocol: message types, record keys and the typed payloads both sides
build and parse. Flower's records carry flat scalars; everything else in the code is typed.

Messages from the coordinator (all replies are checked by tests/client/test_outbound_privacy.py):

| message type        | sent                                        | reply                                   |
|---------------------|---------------------------------------------|-----------------------------------------|
| query.identify      | -                                           | a simulated user's partition id (a      |
|                     |                                             | deployed client: nothing)               |
| query.inventory     | -                                           | artifact ids already in the client cache|
| query.artifact      | one chunk of one file of one artifact       | ack: bytes held, file/artifact verified |
| train               | global base adapter (arrays) + RoundConfig  | updated base adapter (only when the run |
|                     |                                             | federates it) + numbers (*)             |
| evaluate            | global base adapter (arrays) + RoundConfig  | metric numbers (*)                      |
| query.personalize   | global base adapter (arrays) + RoundConfig  | the partition ids whose personal        |
| (simulation only)   | + a cohort of simulated users' partition ids| adapters were trained + numbers         |

(*) none from a deployed client under DP unless the operator and the user opted in
(client.rounds.reply_metrics); docs/federation.md, "What each message carries", lists every key.

query.personalize lets one simulation worker train several sampled users' personal adapters in
one pass (coordinator/cohorts.py); a deployed client, which holds one user's data, refuses it.

Artifacts (the quantized base model, the initial base adapter) are content-addressed: their id is
the sha256 of their sorted file-hash list (`shared.model_manifest.model_hash`), so "do you have it" is a set
membership test and a received artifact is verified file by file before it is used.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from .config import METHODS as KNOWN_METHODS
from .model_manifest import directory_manifest, model_hash

# Message types (Flower: "<category>.<action>").
IDENTIFY = "query.identify"
INVENTORY = "query.inventory"
ARTIFACT = "query.artifact"
TRAIN = "train"
EVALUATE = "evaluate"
PERSONALIZE = "query.personalize"

# Record keys.
ARRAYS = "arrays"  # ArrayRecord: the base adapter (Flower strategies' default key)
CONFIG = "config"  # ConfigRecord: RoundConfig (Flower strategies' default key)
METRICS = "metrics"  # MetricRecord: numbers only
CHUNK = "chunk"  # ConfigRecord: ChunkHeader
DATA = "data"  # ArrayRecord: {"bytes": uint8[...]} one chunk's payload
REPLY = "reply"  # ConfigRecord: small replies (inventory, ack)
COHORT = "cohort"  # ConfigRecord: {PARTITIONS: [partition ids]} of a query.personalize message
PARTITIONS = "partitions"  # the simulated users a query.personalize asks for / its reply trained
MAX_COHORT = 1024  # users in one query.personalize (a cohort is train.users_per_pass users)

NUM_EXAMPLES = "num-examples"
NUM_QUERIES = "num-queries"
AGG_WEIGHT = "agg-weight"  # set by the coordinator after validation (uniform under DP)

KIND_MODEL = "base-model"
KIND_BASE_ADAPTER = "base-adapter"

# What a client accepts from the network (a coordinator, or anyone between it and the client).
MAX_MANIFEST_CHARS = 1 << 20  # an artifact manifest is a few KB
MAX_ARTIFACT_FILES = 256
MAX_ARTIFACT_BYTES = 64 << 30  # larger than any base model this framework runs on a user's machine
# Weights travel as safetensors only: a file format that can run code when loaded (pickle,
# torch.save, numpy object arrays, joblib) is refused before a byte of it is written.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")
# Nor is code: a model directory with Python modules (transformers' auto_map / remote code), native
# libraries or scripts would put the coordinator's code one import away from the user's machine.
CODE_FILE = re.compile(r"\.(py|pyc|pyo|pyd|pyw|pyx|pxd|pyi|so|dylib|dll|exe|com|bat|cmd|ps1|sh|bash|zsh|js|mjs|"
                       r"ipynb|jar|class|whl|egg)$|\.so(\.\d+)+$|(^|/)__pycache__/", re.IGNORECASE)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ClientError(RuntimeError):
    """A client failure whose message is safe to send back (it never quotes user data).
    Any other exception is reported to the coordinator by its type only."""


class ProtocolError(ClientError, ValueError):
    """A message from the coordinator that does not follow this protocol. Its text names only
    protocol keys and coordinator-sent values, never user data, so it goes back as is."""


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
        if not isinstance(text, str) or len(text) > MAX_MANIFEST_CHARS:
            raise ProtocolError(f"artifact manifest is not text of at most {MAX_MANIFEST_CHARS} characters")
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or set(d) - {"id", "kind", "files", "sizes", "identity"}:
                raise TypeError("unknown keys")
            if not all(isinstance(v, str) for v in (d["id"], d["kind"], d.get("identity", ""))):
                raise TypeError("id, kind and identity must be strings")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in d["files"].items()):
                raise TypeError("files must map paths to sha256 strings")
            if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                       for k, v in d["sizes"].items()):
                raise TypeError("sizes must map paths to integers")
            m = cls(d["id"], d["kind"], dict(d["files"]), dict(d["sizes"]), d.get("identity", ""))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProtocolError(f"unreadable artifact manifest ({type(e).__name__})") from None
        m.check()
        return m

    def check(self) -> None:
        """The id must be the hash of the file list, paths must stay inside the artifact, sizes
        must be plausible, and no file may be code or in a format that runs code when loaded."""
        if not _HEX64.match(self.id):
            raise ProtocolError("artifact id must be 64 lowercase hex digits (a sha256)")
        if self.kind not in (KIND_MODEL, KIND_BASE_ADAPTER):
            raise ProtocolError(f"artifact {self.id[:12]}: kind {self.kind[:40]!r} is not one of "
                             f"{KIND_MODEL!r}, {KIND_BASE_ADAPTER!r}")
        if self.identity and not _HEX64.match(self.identity):
            raise ProtocolError(f"artifact {self.id[:12]}: identity must be a sha256 hex digest")
        if set(self.files) != set(self.sizes):
            raise ProtocolError(f"artifact {self.id[:12]}: file and size lists differ")
        if not 0 < len(self.files) <= MAX_ARTIFACT_FILES:
            raise ProtocolError(f"artifact {self.id[:12]}: {len(self.files)} files; 1 to {MAX_ARTIFACT_FILES} allowed")
        dirs: set[str] = set()
        for rel in self.files:
            p = PurePosixPath(rel)
            if (p.is_absolute() or not rel or rel.startswith(".") or any(part in ("", ".", "..") for part in rel.split("/"))
                    or "\\" in rel or any(ord(c) < 32 for c in rel) or len(rel) > 255):
                raise ProtocolError(f"artifact {self.id[:12]}: unsafe file path {rel[:80]!r}")
            if rel.lower().endswith(PICKLE_SUFFIXES):
                raise ProtocolError(f"artifact {self.id[:12]}: {rel[:80]!r} is in a pickle-based format; weights are "
                                 "accepted as safetensors only")
            if CODE_FILE.search(rel):
                raise ProtocolError(f"artifact {self.id[:12]}: {rel[:80]!r} is a code file; artifacts carry weights, "
                                    "configuration and tokenizer files only (no model code is ever run)")
            if not _HEX64.match(self.files[rel]):
                raise ProtocolError(f"artifact {self.id[:12]}: {rel[:80]!r} has no sha256 hex digest")
            dirs.update(str(parent) for parent in p.parents if str(parent) != ".")
        if dirs & set(self.files):
            raise ProtocolError(f"artifact {self.id[:12]}: a path is both a file and a directory")
        if any(n < 0 for n in self.sizes.values()) or self.total_bytes > MAX_ARTIFACT_BYTES:
            raise ProtocolError(f"artifact {self.id[:12]}: sizes must be >= 0 and total at most {MAX_ARTIFACT_BYTES} bytes")
        if model_hash(self.files) != self.id:
            raise ProtocolError(f"artifact {self.id[:12]}: id is not the hash of its file list")


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
        unknown = sorted(set(rec) - {"manifest", "files", "offsets", "lengths"})
        if unknown:
            raise ProtocolError(f"chunk header: unknown keys {unknown[:3]}")
        try:
            manifest, files, offsets, lengths = rec["manifest"], rec["files"], rec["offsets"], rec["lengths"]
        except KeyError as e:
            raise ProtocolError(f"chunk header: missing {e.args[0]!r}") from None
        if not isinstance(manifest, str) or not all(isinstance(x, list) for x in (files, offsets, lengths)):
            raise ProtocolError("chunk header: manifest must be text and files, offsets, lengths lists")
        if not all(isinstance(f, str) for f in files) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (*offsets, *lengths)):
            raise ProtocolError("chunk header: files must be paths and offsets/lengths non-negative integers")
        h = cls(manifest, tuple(files), tuple(offsets), tuple(lengths))
        if not len(h.files) == len(h.offsets) == len(h.lengths):
            raise ProtocolError("chunk header: files, offsets and lengths differ in length")
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
        """Parse strictly: a wrong type, a non-finite number, an unknown `oppu-` key or an unknown
        method is refused with a ValueError naming the key (Flower's own keys pass through)."""
        names = {f.name for f in fields(cls)} | {"keys"}  # oppu-keys: SecAgg+'s tensor order (coordinator/secagg.py)
        unknown = sorted(k for k in rec if k.startswith("oppu-") and k[5:] not in names)
        if unknown:
            raise ProtocolError(f"round config: unknown keys {unknown[:3]} (a newer coordinator? update this client)")
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
            raise ProtocolError(f"round config lacks {', '.join(missing)}")

        def number(name: str, lo: float, hi: float, *, integer: bool = False) -> Any:
            v = kw.get(name, getattr(cls, name, None))
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
                raise ProtocolError(f"round config: {name} must be {'an integer' if integer else 'a number'}")
            if not (math.isfinite(v) and lo <= v <= hi):
                raise ProtocolError(f"round config: {name}={v!r} is outside [{lo}, {hi}]")
            return v

        def flag(name: str) -> bool:
            v = kw.get(name, False)
            if not isinstance(v, bool):
                raise ProtocolError(f"round config: {name} must be true or false")
            return v

        for name in ("task", "model", "base_adapter", "methods"):
            if not isinstance(kw.get(name, ""), str):
                raise ProtocolError(f"round config: {name} must be text")
        for name in ("model", "base_adapter"):
            if not _HEX64.match(kw[name]):
                raise ProtocolError(f"round config: {name} must be an artifact id (64 hex digits)")
        methods = kw.get("methods", "")
        bad = [m for m in methods.split(",") if m and m not in KNOWN_METHODS]
        if bad:
            raise ProtocolError(f"round config: unknown methods {bad[:3]}; known: {', '.join(KNOWN_METHODS)}")
        if len(kw["task"]) > 200:
            raise ProtocolError("round config: task name too long")
        return cls(
            server_round=number("server_round", 0, 1e9, integer=True), task=kw["task"], model=kw["model"],
            base_adapter=kw["base_adapter"], federate=flag("federate"), ffa_lora=flag("ffa_lora"),
            proximal_mu=float(number("proximal_mu", 0.0, 1e6)), methods=methods,
            epsilon=float(number("epsilon", -1.0, 1e12)), delta=float(number("delta", 0.0, 1.0)),
        )

    @property
    def method_list(self) -> list[str]:
        return [m for m in self.methods.split(",") if m]


def cohort_partitions(record: Mapping[str, Any]) -> list[int]:
    """The partition ids a query.personalize cohort record names: distinct non-negative integers,
    at most MAX_COHORT; anything else is a ProtocolError naming what is wrong."""
    value = record.get(PARTITIONS)
    if not isinstance(value, list) or not value or len(value) > MAX_COHORT:
        raise ProtocolError(f"cohort: {PARTITIONS} must be a list of 1 to {MAX_COHORT} partition ids")
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in value) or len(set(value)) != len(value):
        raise ProtocolError(f"cohort: {PARTITIONS} must hold distinct non-negative integers")
    return list(value)


def is_lora_b(key: str) -> bool:
    """FFA-LoRA exchanges only these (LoRA A stays frozen at its shared initial value)."""
    return ".lora_B." in key or key.endswith(".lora_B.weight")


__all__ = [
    "IDENTIFY", "INVENTORY", "ARTIFACT", "TRAIN", "EVALUATE", "PERSONALIZE", "ARRAYS", "CONFIG", "METRICS", "CHUNK",
    "DATA", "REPLY", "COHORT", "PARTITIONS", "MAX_COHORT", "cohort_partitions",
    "NUM_EXAMPLES", "NUM_QUERIES", "AGG_WEIGHT", "KIND_MODEL", "KIND_BASE_ADAPTER", "ArtifactManifest",
    "manifest_for_dir", "ChunkHeader", "RoundConfig", "ClientError", "ProtocolError", "is_lora_b",
]
