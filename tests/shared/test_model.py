"""shared/model.py: what load_base_model leaves behind (nf4 layers that train through, each load
counted)."""

import os

import pytest

from shared.config import BaseModelSpec
from shared.model import load_base_model, load_count


@pytest.mark.realmodel
def test_nf4_layers_keep_the_trainable_layout(real_engine):
    import bitsandbytes as bnb

    layers = [m for m in real_engine.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert real_engine.base.quantization == "nf4" and len(layers) >= 200
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    # 4-bit storage: well under half of the fp32 parameter bytes.
    assert real_engine.base.model.get_memory_footprint() < 0.4 * 134_515_008 * 4


def test_each_load_is_counted_and_logged(tiny_model_dir, tmp_path, monkeypatch):
    log = tmp_path / "loads.log"
    monkeypatch.setenv("OPPU_LOAD_LOG", str(log))
    before = load_count()
    load_base_model(BaseModelSpec(path=str(tiny_model_dir), quantization="none"))
    assert load_count() == before + 1
    assert log.read_text().split() == [str(os.getpid())]
