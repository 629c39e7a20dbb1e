"""Typed configuration, parsed once from TOML (or a flat dict such as a Flower run-config).

specs       the specs every part shares (model, adapters, training, selection, retrieval,
            decoding, privacy, data, experiment)
parsing     TOML / dicts / dotted overrides -> specs, field-naming errors; the TOML writer; presets
federation  the federation settings and their Flower run-config form
tasks       tasks a person defines ([[tasks]] tables) -> shared.tasks.Task, registered by name

The daemon's settings live with the daemon (client/settings.py), the privacy ablation's grid
with the ablation (simulations/ablation_spec.py).
"""

from .federation import (
    BASE_INITS, STRATEGIES, FederatedSpec, FederationSpec, dump_federated_toml, federated_to_dict, from_run_config,
    load_federated, to_run_config,
)
from .parsing import PRESETS, apply_overrides, dump_toml, from_dict, load_experiment, parse_config_file, to_dict
from .tasks import KIND_METRICS, TASK_KINDS, TaskSpec, load_task_file, register_specs
from .specs import (
    AUGMENTATIONS, METHOD_AUGMENTATION, PERSONAL_METHODS, BASELINES, DEVICES, DTYPES, EMBEDDED_MODEL, HISTORY_TOPICS, ITEM_FORMATS, METHODS, PEFT_TYPES, QUANTIZATIONS,
    RECORD_LEVELS, RETRIEVERS, SELECTIONS, STORES, BASE_WHEN_MISSING, AdapterSpec, BaseModelSpec, BuiltinBaseSpec, DataSpec,
    DecodingSpec, ExperimentSpec, PrivacySpec,
    RetrievalSpec, SelectionSpec, TrainSpec,
)

__all__ = [
    "AdapterSpec", "BaseModelSpec", "BuiltinBaseSpec", "BASE_WHEN_MISSING", "DataSpec", "DecodingSpec", "ExperimentSpec",
    "PrivacySpec", "RetrievalSpec", "SelectionSpec",
    "TrainSpec", "TaskSpec", "TASK_KINDS", "KIND_METRICS", "load_task_file", "register_specs",
    "FederationSpec", "FederatedSpec", "AUGMENTATIONS", "METHOD_AUGMENTATION", "PERSONAL_METHODS",
    "BASELINES", "BASE_INITS", "DEVICES", "DTYPES", "EMBEDDED_MODEL", "HISTORY_TOPICS", "ITEM_FORMATS", "METHODS",
    "PEFT_TYPES", "QUANTIZATIONS", "RECORD_LEVELS", "RETRIEVERS", "SELECTIONS", "STORES", "STRATEGIES", "PRESETS",
    "apply_overrides", "dump_toml", "from_dict", "load_experiment", "parse_config_file", "to_dict",
    "dump_federated_toml", "federated_to_dict", "from_run_config", "load_federated", "to_run_config",
]
