"""shared/devices.py: the compute dtype "auto" picks bf16 only where the hardware multiplies it,
and OPPU_COMPUTE_DTYPE overrides "auto" only."""

import pytest

from shared import devices
from shared.config import BaseModelSpec


def test_auto_dtype_computes_bf16_only_where_the_hardware_does(monkeypatch):
    import torch

    spec = BaseModelSpec(dtype="auto")
    monkeypatch.delenv(devices.COMPUTE_DTYPE_ENV, raising=False)  # set by --compute-dtype
    monkeypatch.setattr(devices, "cpu_bf16_support", lambda: False)
    assert devices.pick_dtype(spec, "cpu") == torch.float32  # emulated bf16 is slower than fp32
    monkeypatch.setattr(devices, "cpu_bf16_support", lambda: True)
    assert devices.pick_dtype(spec, "cpu") == torch.bfloat16
    assert devices.pick_dtype(BaseModelSpec(dtype="float32"), "cpu") == torch.float32


def test_compute_dtype_environment_overrides_auto_only(monkeypatch):
    """OPPU_COMPUTE_DTYPE runs on one machine what another computes (tests: --compute-dtype)."""
    import torch

    monkeypatch.setattr(devices, "cpu_bf16_support", lambda: True)
    monkeypatch.setenv("OPPU_COMPUTE_DTYPE", "float32")
    assert devices.pick_dtype(BaseModelSpec(dtype="auto"), "cpu") == torch.float32
    assert devices.pick_dtype(BaseModelSpec(dtype="bfloat16"), "cpu") == torch.bfloat16  # the config's own choice
    monkeypatch.setattr(devices, "cpu_bf16_support", lambda: False)
    monkeypatch.setenv("OPPU_COMPUTE_DTYPE", "bfloat16")
    assert devices.pick_dtype(BaseModelSpec(dtype="auto"), "cpu") == torch.bfloat16
    monkeypatch.setenv("OPPU_COMPUTE_DTYPE", "bf16")
    with pytest.raises(ValueError, match="OPPU_COMPUTE_DTYPE='bf16': expected one of auto, float32, bfloat16"):
        devices.pick_dtype(BaseModelSpec(dtype="auto"), "cpu")
