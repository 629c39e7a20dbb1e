"""Adapters on disk: PEFT's own format (plain `peft` loads it), a manifest, atomic writes."""

import json

import pytest
import torch

from shared.adapters import ADAPTER_MANIFEST, AdapterManifest, verify_adapter_dir
from shared.config import TrainSpec
from shared.training import Example

EXAMPLES = [Example(f"Which tag? movie {i}", "comedy") for i in range(8)]


def _manifest(engine):
    return AdapterManifest(role="personal", base_model_hash=engine.model_hash, task="synthetic-tag",
                           peft_type="lora", data={"history_items": 8})


def test_saved_personal_adapter_loads_with_plain_peft(tiny_engine, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tiny_engine.train_personal(EXAMPLES, TrainSpec(epochs=1, lr=1e-2), progress=False)
    target = tiny_engine.save_personal(tmp_path / "personal", _manifest(tiny_engine))
    assert {"adapter_config.json", "adapter_model.safetensors", ADAPTER_MANIFEST} <= {p.name for p in target.iterdir()}
    manifest = json.loads((target / ADAPTER_MANIFEST).read_text())
    assert manifest["base_model_hash"] == tiny_engine.model_hash and manifest["data"] == {"history_items": 8}
    assert "adapter_model.safetensors" in manifest["files"]

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    plain = PeftModel.from_pretrained(base, str(target))
    ours = tiny_engine.personal_state()
    from peft import get_peft_model_state_dict

    theirs = get_peft_model_state_dict(plain)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_load_round_trip_and_refusals(tiny_engine, tmp_path):
    tiny_engine.train_personal(EXAMPLES, TrainSpec(epochs=1, lr=1e-2), progress=False)
    saved = {k: v.clone() for k, v in tiny_engine.personal_state().items()}
    target = tiny_engine.save_personal(tmp_path / "p", _manifest(tiny_engine))
    tiny_engine.reset_personal()
    tiny_engine.load_personal(target)
    assert all(torch.equal(saved[k], v) for k, v in tiny_engine.personal_state().items())

    # A different base model's adapter is refused.
    m = json.loads((target / ADAPTER_MANIFEST).read_text())
    m["base_model_hash"] = "0" * 64
    (target / ADAPTER_MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="trained on base model 000000000000"):
        tiny_engine.load_personal(target)

    # A tampered weights file is refused before anything is loaded.
    target2 = tiny_engine.save_personal(tmp_path / "q", _manifest(tiny_engine))
    with open(target2 / "adapter_model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256 does not match"):
        verify_adapter_dir(target2)


def test_failed_save_keeps_previous_adapter(tiny_engine, tmp_path, monkeypatch):
    target = tiny_engine.save_personal(tmp_path / "p", _manifest(tiny_engine))
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tiny_engine.model), "save_pretrained", disk_full)
    with pytest.raises(OSError):
        tiny_engine.save_personal(target, _manifest(tiny_engine))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temporary leftovers
    verify_adapter_dir(target)


@pytest.mark.parametrize("peft_type", ["ia3", "prompt_tuning"])
def test_other_peft_types_train_stacked_and_load_with_plain_peft(tiny_model_dir, tmp_path, peft_type):
    """IA3 and prompt tuning are selectable for the personal adapter, stacked on a frozen base
    adapter, and saved in PEFT's own format."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from shared.config import AdapterSpec, BaseModelSpec
    from shared.engine import Engine

    if peft_type == "ia3":
        base_spec = personal_spec = AdapterSpec(peft_type="ia3", target_modules=("k_proj", "v_proj", "down_proj"))
    else:
        base_spec, personal_spec = AdapterSpec(), AdapterSpec(peft_type="prompt_tuning", num_virtual_tokens=4)
    engine = Engine(BaseModelSpec(path=str(tiny_model_dir), quantization="none"), base_spec, personal_spec)
    base_before = {k: v.clone() for k, v in engine.base_state().items()}
    prompts = [EXAMPLES[0].prompt]
    engine.train_personal(EXAMPLES, TrainSpec(epochs=2, lr=5e-2), progress=False)
    state = {k: v.clone() for k, v in engine.personal_state().items()}
    assert any(not torch.equal(state[k], engine._personal_init[k]) for k in state)
    assert all(torch.equal(base_before[k], v) for k, v in engine.base_state().items())
    # The personal adapter is used at inference, and only when asked for.
    assert engine.answer(prompts, max_new_tokens=3, personal=False) == engine.answer(prompts, max_new_tokens=3, personal=False)
    with_personal = sum(engine.example_losses(EXAMPLES, personal=True))
    without = sum(engine.example_losses(EXAMPLES, personal=False))
    assert with_personal < without

    target = engine.save_personal(tmp_path / "p", _manifest(engine))
    engine.reset_personal()
    engine.load_personal(target)
    assert all(torch.equal(state[k], v) for k, v in engine.personal_state().items())
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(target))
    from peft import get_peft_model_state_dict

    theirs = get_peft_model_state_dict(plain)
    assert set(theirs) == set(state) and all(torch.allclose(state[k].float(), theirs[k].float()) for k in state)
