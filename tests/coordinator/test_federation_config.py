"""FederatedSpec: parsed once from TOML or Flower's run-config, with errors that name the field;
pyproject's [tool.flwr.app.config] lists every setting with the dataclass defaults."""

import tomllib
from pathlib import Path

import pytest

from shared.config import (
    FederatedSpec, dump_federated_toml, from_run_config, load_federated, to_run_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_run_config_is_every_setting_at_its_default():
    from flwr.common.config import flatten_dict

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flat = flatten_dict(project["tool"]["flwr"]["app"]["config"])
    assert flat == to_run_config(FederatedSpec())
    assert from_run_config(flat) == FederatedSpec()
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "coordinator.server_app:app", "clientapp": "client.client_app:app"}


def test_run_config_and_toml_round_trip(tmp_path):
    spec = load_federated(ROOT / "simulations" / "configs" / "federated.toml")
    assert spec.federation.rounds == 3 and spec.experiment.data.users >= 8 and spec.dp
    assert from_run_config(to_run_config(spec)) == spec
    (tmp_path / "c.toml").write_text(dump_federated_toml(spec))
    assert load_federated(tmp_path / "c.toml") == spec
    assert all(isinstance(v, (bool, int, float, str)) for v in to_run_config(spec).values())


@pytest.mark.parametrize("overrides, message", [
    (["federation.strategy='fedsgd'"], "federation.strategy='fedsgd' is not allowed; choose one of fedavg"),
    (["federation.fraction_train=0"], "federation.fraction_train"),
    (["privacy.noise_multiplier=1.0"], "privacy.federate_base_adapter"),
    (["privacy.noise_multiplier=1.0", "privacy.federate_base_adapter=true", "federation.strategy='fedadam'"],
     "fedadam"),
    (["privacy.epsilon_budget=3.0"], "privacy.epsilon_budget"),
    (["federation.ffa_lora=true", "base_adapter.peft_type='ia3'"], "federation.ffa_lora"),
    (["federation.secagg=true"], "federation.secagg"),
    (["federation.bogus=1"], "unknown setting federation.bogus"),
])
def test_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_federated(None, overrides)


def test_flat_run_config_errors_say_where_they_come_from():
    with pytest.raises(ValueError, match="Flower run-config: .*federation.rounds"):
        from_run_config({"federation.rounds": 0})
