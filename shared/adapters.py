"""Base/personal adapter stacking, state exchange, and save/load with a manifest.

The base model is wrapped by PEFT exactly once per process. The shared base adapter is named
"base"; the private one "personal". They are stacked, never merged: a 4-bit base cannot be
merged into, and in PEFT `add_adapter` after `merge_adapter` silently unmerges. Training the
personal adapter activates both and leaves only the personal one trainable; moving to another
user resets the personal adapter's weights in place instead of re-wrapping the model.

On disk an adapter is PEFT's own format (adapter_config.json + adapter_model.safetensors, so
plain `peft` loads it) plus `oppu_adapter.json`: base-model hash, task, the data it saw (counts,
never content), privacy spent, framework version and the sha256 of each file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import AdapterSpec
from .fileio import atomic_dir
from .model_manifest import sha256_file

BASE = "base"
PERSONAL = "personal"
ADAPTER_MANIFEST = "oppu_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's name for an adapter's weights
TRAINED_ON = "base_adapter"  # a personal adapter's manifest: train[TRAINED_ON] = the base adapter's version
FRAMEWORK_VERSION = "0.1.0"


def peft_config(spec: AdapterSpec) -> Any:
    from peft import IA3Config, LoraConfig

    if spec.peft_type == "lora":
        return LoraConfig(
            r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=list(spec.target_modules),
            task_type="CAUSAL_LM",
        )
    if spec.peft_type == "ia3":
        # IA3 scales keys/values and the MLP down-projection input; feedforward modules must be
        # a subset of the targets, so we only declare one when it is targeted.
        ff = [m for m in spec.target_modules if m in ("down_proj", "fc2", "mlp")]
        return IA3Config(target_modules=list(spec.target_modules), feedforward_modules=ff, task_type="CAUSAL_LM")
    raise ValueError(
        f"adapter.peft_type={spec.peft_type!r} cannot be the shared base adapter; "
        "use lora or ia3 there (prompt_tuning is available for the personal adapter)"
    )


def wrap(model: Any, base_spec: AdapterSpec) -> Any:
    """Wrap the frozen base model with PEFT once, creating the shared base adapter slot."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(0)  # the base adapter's initial weights are part of the experiment
    pm = get_peft_model(model, peft_config(base_spec), adapter_name=BASE)
    return pm


def add_slot(pm: Any, name: str, spec: AdapterSpec, seed: int = 0) -> dict[str, Any]:
    """Add an adapter slot (e.g. "personal"); returns its initial state for later in-place resets."""
    import torch

    if spec.peft_type != pm.peft_config[BASE].peft_type.value.lower():
        raise ValueError(
            f"personal adapter type {spec.peft_type!r} differs from the base adapter's "
            f"{pm.peft_config[BASE].peft_type.value.lower()!r}; PEFT stacks adapters of one type. "
            "Set base_adapter.peft_type and personal_adapter.peft_type to the same value."
        )
    torch.manual_seed(seed)
    pm.add_adapter(name, peft_config(spec))
    return {k: v.detach().clone() for k, v in get_state(pm, name).items()}


def activate(pm: Any, names: list[str], trainable: str | None = None) -> None:
    """Make `names` the active (stacked) adapters; only `trainable` gets gradients."""
    pm.base_model.set_adapter(list(names))
    for n, p in pm.named_parameters():
        p.requires_grad_(trainable is not None and _belongs_to(n, trainable))


def _belongs_to(param_name: str, adapter: str) -> bool:
    return f".{adapter}." in param_name or param_name.endswith(f".{adapter}")


def trainable_parameters(pm: Any, name: str) -> list[Any]:
    return [p for n, p in pm.named_parameters() if _belongs_to(n, name)]


def get_state(pm: Any, name: str) -> dict[str, Any]:
    """The adapter's tensors keyed as PEFT saves them (adapter name stripped)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(pm, adapter_name=name)


def set_state(pm: Any, name: str, state: dict[str, Any]) -> None:
    """Load tensors into an existing adapter slot in place; keys and shapes must match exactly."""
    import torch
    from peft import set_peft_model_state_dict

    current = get_state(pm, name)
    missing = sorted(set(current) - set(state))
    unknown = sorted(set(state) - set(current))
    if missing or unknown:
        raise ValueError(
            f"adapter {name!r}: state does not fit this model (missing {missing[:3]}, unknown {unknown[:3]})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise ValueError(f"adapter {name!r}: {k} has shape {tuple(v.shape)}, expected {tuple(current[k].shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"adapter {name!r}: {k} holds NaN or inf")
    result = set_peft_model_state_dict(pm, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter {name!r}: unexpected keys {unexpected[:3]}")


def lora_scaling(pm: Any, name: str) -> float:
    cfg = pm.peft_config[name]
    return cfg.lora_alpha / (cfg.r ** 0.5 if getattr(cfg, "use_rslora", False) else cfg.r)


def stack_problem(pm: Any, *, base: str = BASE, personal_slot: str = PERSONAL) -> str | None:
    """Why `base` and `personal_slot` cannot be stacked into one LoRA (None: they can)."""
    if personal_slot not in pm.peft_config:
        return "mixed-batch serving needs a LoRA personal adapter slot (prompt tuning has none)"
    cb, cp = pm.peft_config[base], pm.peft_config[personal_slot]
    if cb.peft_type.value != "LORA" or cp.peft_type.value != "LORA":
        return ("mixed-batch serving needs LoRA for both the base and the personal adapter "
                f"(got {cb.peft_type.value.lower()} and {cp.peft_type.value.lower()})")
    if set(cb.target_modules) != set(cp.target_modules):
        return (f"mixed-batch serving needs the same target modules for both adapters "
                f"(base {sorted(cb.target_modules)}, personal {sorted(cp.target_modules)})")
    return None


def stacked_as_one(pm: Any, personal: dict[str, Any], *, base: str = BASE, personal_slot: str = PERSONAL) -> tuple[Any, dict[str, Any]]:
    """One LoRA adapter equal to `base` stacked with the personal weights `personal`.

    Serving many users in one forward pass (PEFT's per-row `adapter_names`) applies exactly ONE
    adapter per row, but every row needs the shared base adapter and its user's personal one.
    Two LoRA deltas add up, and a sum of two low-rank products is one product of rank r1 + r2:
        s1·B1·A1 + s2·B2·A2 = [s1·B1 | s2·B2] · [A1 ; A2]
    so we concatenate them (scales folded into B, the slot's own scale 1). This holds for a 4-bit
    base as well, which cannot have the base adapter merged into its weights.
    The identity is exact in real numbers, not in floating point: one rank-(r1 + r2) product, added
    to the base output once, rounds differently from two products added one after the other (in
    bf16 enough to change a greedy answer). So the one-user answer path answers through such a
    slot too (shared.engine.Engine.answer), and a user's row in a mixed batch computes exactly what
    that user's own batch computes.
    Returns (LoraConfig for the slot, its state keyed as PEFT saves it).
    """
    import torch
    from peft import LoraConfig

    problem = stack_problem(pm, base=base, personal_slot=personal_slot)
    if problem:
        raise ValueError(problem)
    cb, cp = pm.peft_config[base], pm.peft_config[personal_slot]
    base_state = get_state(pm, base)
    sb, sp = lora_scaling(pm, base), lora_scaling(pm, personal_slot)
    out: dict[str, Any] = {}
    for key, a_base in base_state.items():
        if ".lora_A." not in key:
            continue
        kb = key.replace(".lora_A.", ".lora_B.")
        if key not in personal or kb not in personal:
            raise ValueError(f"personal adapter state lacks {key} / {kb}")
        out[key] = torch.cat([a_base, personal[key].to(a_base)], 0)
        out[kb] = torch.cat([base_state[kb] * sb, personal[kb].to(a_base) * sp], 1)
    rank = cb.r + cp.r
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(cb.target_modules),
                        task_type="CAUSAL_LM")
    return config, out


@dataclass
class AdapterManifest:
    """What we record next to every saved adapter (counts, never content)."""

    role: str  # "base" | "personal"
    base_model_hash: str
    task: str
    peft_type: str
    data: dict[str, int] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    framework_version: str = FRAMEWORK_VERSION
    created: float = field(default_factory=time.time)
    files: dict[str, str] = field(default_factory=dict)


def adapter_version(manifest: AdapterManifest) -> str:
    """A saved adapter's version: the sha256 of its weights file, 12 hex digits ("unknown" when its
    manifest lists none). The daemon names the base adapter that answers by it, and every personal
    adapter records the one it was trained on under it (train[TRAINED_ON]), whichever process
    trained it (the daemon, a federated round's ClientApp): equal weights, equal version."""
    return manifest.files.get(WEIGHTS_FILE, "")[:12] or "unknown"


def save_adapter(pm: Any, name: str, target: Path, manifest: AdapterManifest) -> Path:
    """Write PEFT adapter `name` to `target` atomically, in PEFT's own format plus our manifest."""

    def write(tmp: Path) -> None:
        pm.save_pretrained(str(tmp), selected_adapters=[name])
        sub = tmp / name if name != "default" else tmp
        if sub != tmp:
            for f in sub.iterdir():
                os.replace(f, tmp / f.name)
            sub.rmdir()

    return write_adapter_dir(target, write, manifest)


def write_adapter_dir(target: Path, write: Callable[[Path], None], manifest: AdapterManifest) -> Path:
    """Let `write` fill a temporary directory, add the manifest, then swap it into `target`.

    A crash at any point leaves either the previous `target` or the new one, never a mix.
    """
    def fill(tmp: Path) -> None:
        write(tmp)
        manifest.files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / ADAPTER_MANIFEST).write_text(json.dumps(manifest.__dict__, indent=2, sort_keys=True))

    return atomic_dir(target, fill)


def read_manifest(directory: Path) -> AdapterManifest:
    path = Path(directory) / ADAPTER_MANIFEST
    try:
        data = json.loads(path.read_text())
        return AdapterManifest(**data)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {directory} is not an oppu adapter directory") from None
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: unreadable adapter manifest ({e})") from None


def verify_adapter_dir(directory: Path, *, base_model_hash: str | None = None) -> AdapterManifest:
    """Check file hashes (and the base model it was trained on) before trusting an adapter."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for fname, digest in manifest.files.items():
        f = directory / fname
        if not f.is_file() or sha256_file(f) != digest:
            raise ValueError(f"{f}: sha256 does not match {directory / ADAPTER_MANIFEST}; the adapter is corrupt")
    if base_model_hash is not None and manifest.base_model_hash != base_model_hash:
        raise ValueError(
            f"{directory} was trained on base model {manifest.base_model_hash[:12]}, "
            f"but the loaded base model is {base_model_hash[:12]}"
        )
    return manifest


def load_adapter(pm: Any, name: str, directory: Path, *, base_model_hash: str | None = None) -> AdapterManifest:
    """Verify and load a saved adapter into slot `name` in place (safetensors only, never pickle)."""
    from safetensors.torch import load_file

    manifest = verify_adapter_dir(directory, base_model_hash=base_model_hash)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing (only safetensors adapters are loaded)")
    try:
        state = load_file(str(weights), device=str(next(pm.parameters()).device))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (not a ValueError)
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    dtype = next(iter(get_state(pm, name).values())).dtype
    set_state(pm, name, {k: v.to(dtype) for k, v in state.items()})
    return manifest
