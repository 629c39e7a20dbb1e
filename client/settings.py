"""Settings of the client daemon (client/daemon.py): one long-running process per user's data
directory, configured by DIR/daemon.toml plus `--set` overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import (
    AUGMENTATIONS, METHOD_AUGMENTATION, PERSONAL_METHODS, AdapterSpec, BaseModelSpec, BuiltinBaseSpec, DecodingSpec,
    ExperimentSpec,
    RetrievalSpec, SelectionSpec,
    TaskSpec, TrainSpec, from_dict, parse_config_file, register_specs,
)
from shared.config.specs import _choice, _positive
from shared.tasks import TASKS

from client.appgate import check_hashes

# The personal method each augmentation's adapter answers as (what the daemon reports).
AUGMENTATION_METHOD = {METHOD_AUGMENTATION[m]: m for m in PERSONAL_METHODS}
DEFAULT_ARTIFACT_QUOTA_MB = 10240.0  # a few base models; the nf4 SmolLM2-135M is ~180 MB
ARTIFACTS_DIR = "artifacts"  # DIR/artifacts: the default artifact cache


@dataclass(frozen=True)
class DaemonSpec:
    """Settings of `oppu client daemon`: the local API, the private adapter's lifecycle, federation.

    Read from DIR/daemon.toml (or --config) plus `--set` overrides; the model/adapter/training
    sections are the same dataclasses the experiment harness uses.
    """

    task: str = field(default="amazon-rating", metadata={"help": "Task whose items the history holds (see `oppu tasks`)."})
    tasks: tuple[TaskSpec, ...] = field(
        default=(), metadata={"help": "Tasks of your own, one [[tasks]] table each (shared/config/tasks.py); "
                              "`task` may name one of them."})
    host: str = field(default="127.0.0.1", metadata={"help": "Loopback address the API binds (127.0.0.1 or ::1 only)."})
    port: int = field(default=8731, metadata={"help": "API port; 0 picks a free one (written to DIR/daemon.json)."})
    augmentation: str = field(
        default="rag",
        metadata={"help": "plain (OPPU) | rag (OPPU+RAG) | pag (OPPU+PAG): prompt context for training and asking."},
    )
    keep_versions: int = field(default=3, metadata={"help": "Personal-adapter versions kept on disk (newest first)."})
    retrain_after: int = field(
        default=50, metadata={"help": "Start training automatically after this many new history items; 0 = never."}
    )
    train_nice: int = field(default=10, metadata={"help": "Niceness added to the training thread (0-19)."})
    max_batch_items: int = field(default=1000, metadata={"help": "Most history items accepted in one request."})
    max_field_chars: int = field(default=20000, metadata={"help": "Longest accepted text of one item field or question."})
    max_request_mb: float = field(default=32.0, metadata={"help": "Largest accepted JSON request body, in MiB."})
    max_import_mb: float = field(default=1024.0, metadata={"help": "Largest accepted import archive (packed and unpacked), in MiB."})
    base_adapter_dir: str = field(
        default="",
        metadata={"help": "Saved shared base adapter to load; empty: DIR/base_adapter when a coordinator sent one, "
                  "else the built-in one cached for the task (builtin_base)."},
    )
    coordinator: str = field(
        default="",
        metadata={"help": "HOST:PORT of the federation's SuperLink (Flower 1.42 serves its Fleet API on the "
                  "SuperLink's --port); empty = local only."},
    )
    supernode_command: str = field(
        default="flower-supernode", metadata={"help": "Executable started to join the federation as a SuperNode."}
    )
    backoff_initial: float = field(default=2.0, metadata={"help": "Seconds before the first SuperNode restart."})
    backoff_max: float = field(default=300.0, metadata={"help": "Longest wait between SuperNode restarts, in seconds."})
    coordinator_root_certificates: str = field(
        default="", metadata={"help": "CA certificate (PEM) of the SuperLink's TLS certificate: the SuperNode "
                              "connects over TLS. A coordinator needs this or insecure = true (docs/federation.md)."})
    insecure: bool = field(
        default=False, metadata={"help": "Join the coordinator over an unencrypted connection (Flower's --insecure): "
                                 "an explicit opt-in, shown in `oppu client status`; only on a trusted network."})
    trusted_app_hashes: tuple[str, ...] = field(
        default=(), metadata={"help": "sha256 of the app bundles (.fab) this machine may run; any other is refused "
                              "(client/appgate.py). Empty, with no trusted_entities: no bundle runs."})
    trusted_entities: str = field(
        default="", metadata={"help": "Flower trusted-entities YAML (key id: ssh-ed25519 public key): only bundles "
                              "signed by one of these publishers run (flower-supernode --trusted-entities)."})
    supernode_auth_key: str = field(
        default="", metadata={"help": "This node's private key for Flower node authentication (needs TLS); its "
                              "public key is registered with `flwr supernode register`."})
    artifact_cache: str = field(
        default="", metadata={"help": "Where artifacts received from the coordinator (base model, base adapter) are "
                              "cached; empty: DIR/artifacts. Only this setting decides it, never the coordinator."})
    artifact_quota_mb: float = field(
        default=DEFAULT_ARTIFACT_QUOTA_MB,
        metadata={"help": "Most MiB the artifact cache may hold, complete and partial downloads together; an "
                  "artifact that would not fit is refused before its first byte is written."})
    base_model: BaseModelSpec = field(default_factory=BaseModelSpec)
    base_adapter: AdapterSpec = field(default_factory=AdapterSpec)
    personal_adapter: AdapterSpec = field(default_factory=AdapterSpec)
    # The experiments' personal recipe, whatever it is (one set of defaults, docs/quality.md).
    personal_train: TrainSpec = field(default_factory=lambda: ExperimentSpec().personal_train)
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    retrieval: RetrievalSpec = field(default_factory=RetrievalSpec)
    builtin_base: BuiltinBaseSpec = field(default_factory=BuiltinBaseSpec)
    decoding: DecodingSpec = field(default_factory=DecodingSpec)

    def __post_init__(self) -> None:
        import ipaddress

        register_specs(self.tasks, "the daemon's [[tasks]]")  # get_task finds them from here on
        _choice("daemon.task", self.task, tuple(TASKS))
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"daemon.host={self.host!r} must be a loopback address (127.0.0.1 or ::1): "
                             "the API serves one user's private data on their own machine")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"daemon.port={self.port!r} must be in 0-65535 (0 picks a free port)")
        _choice("daemon.augmentation", self.augmentation, AUGMENTATIONS)
        _positive("daemon.keep_versions", self.keep_versions)
        _positive("daemon.retrain_after", self.retrain_after, allow_zero=True)
        if not 0 <= self.train_nice <= 19:
            raise ValueError(f"daemon.train_nice={self.train_nice!r} must be in 0-19")
        for name in ("max_batch_items", "max_field_chars", "max_request_mb", "max_import_mb",
                     "backoff_initial", "backoff_max"):
            _positive(f"daemon.{name}", getattr(self, name))
        if self.backoff_max < self.backoff_initial:
            raise ValueError(f"daemon.backoff_max={self.backoff_max!r} must be >= daemon.backoff_initial")
        if self.coordinator:
            parse_host_port(self.coordinator, "daemon.coordinator")
        check_hashes(self.trusted_app_hashes)
        if not math.isfinite(self.artifact_quota_mb):
            raise ValueError(f"daemon.artifact_quota_mb={self.artifact_quota_mb!r} must be a finite number of MiB")
        _positive("daemon.artifact_quota_mb", self.artifact_quota_mb)
        if any(c in self.artifact_cache for c in "'\n\r"):
            # Passed to the SuperNode in a TOML literal string (--node-config), which cannot hold these.
            raise ValueError(f"daemon.artifact_cache={self.artifact_cache!r} contains a quote or newline; "
                             "choose a directory without them")
        if not self.supernode_command.strip():
            raise ValueError("daemon.supernode_command is empty; e.g. flower-supernode")
        if self.retrieval.store != "chroma":
            raise ValueError("retrieval.store must be 'chroma' for the daemon: the user's history lives on disk")


    def artifact_root(self, data_dir: str | Path) -> Path:
        """The artifact cache directory: `artifact_cache`, or DIR/artifacts."""
        return Path(self.artifact_cache).expanduser() if self.artifact_cache else Path(data_dir) / ARTIFACTS_DIR


def parse_host_port(text: str, name: str = "address") -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port), with an error naming `name`."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535 or any(c.isspace() for c in host):
        raise ValueError(f"{name}={text!r} must look like HOST:PORT, e.g. 192.168.1.10:9092")
    return host, int(port)


def load_daemon(path: str | Path | None = None, overrides: list[str] | None = None) -> DaemonSpec:
    """Parse a daemon TOML file (optional; top-level keys plus model/adapter/training sections)."""
    return parse_config_file(path, overrides, lambda data: from_dict(DaemonSpec, data))
