"""Communication: bytes per client per round for the base adapter, and the one-time base model.

Measured on the real message payloads: the base adapter travels as a Flower ArrayRecord (the
train message down, the update back up), and the base model as the files of the content-addressed
artifact (coordinator/distribution.py), sent once per client in chunks.
"""

from __future__ import annotations

from coordinator.distribution import Artifact, export_quantized_model
from shared.config import AdapterSpec, BaseModelSpec
from shared.engine import Engine
from shared.model_source import resolve_model_dir
from shared.protocol import KIND_MODEL, is_lora_b


def _record_bytes(arrays: dict) -> int:
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return sum(len(a.data) for a in record.values())


def run(model: str = "") -> dict:
    spec = BaseModelSpec(quantization="nf4", **({"path": model} if model else {}))
    engine = Engine(spec, AdapterSpec())
    state = {k: v.detach().float().cpu().numpy() for k, v in engine.base_state().items()}
    lora = _record_bytes(state)
    ffa = _record_bytes({k: v for k, v in state.items() if is_lora_b(k)})
    exported = Artifact.from_dir(export_quantized_model(spec), KIND_MODEL)
    source = Artifact.from_dir(resolve_model_dir(spec), KIND_MODEL)
    return {
        "base_adapter_lora_bytes_per_direction": lora, "base_adapter_ffa_lora_bytes_per_direction": ffa,
        "lora_round_trip_bytes": 2 * lora, "ffa_lora_round_trip_bytes": 2 * ffa,
        "base_model_nf4_artifact_bytes": sum(exported.manifest.sizes.values()),
        "base_model_source_checkpoint_bytes": sum(source.manifest.sizes.values()),
        "adapter": {"r": AdapterSpec().r, "targets": list(AdapterSpec().target_modules)},
    }
