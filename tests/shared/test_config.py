import pytest

from shared.config import AdapterSpec, BaseModelSpec, ExperimentSpec, load_experiment, dump_toml, to_dict


def test_defaults_follow_the_paper():
    a = AdapterSpec()
    assert (a.peft_type, a.r, a.alpha, a.dropout, a.target_modules) == ("lora", 8, 8, 0.05, ("q_proj", "v_proj"))
    e = ExperimentSpec()
    assert e.personal_train.epochs == 2 and e.personal_train.lr == 1e-4


def test_bad_choice_names_field_and_allowed_values():
    with pytest.raises(ValueError, match=r"base_model.quantization='fp4'.*nf4, int8, none"):
        BaseModelSpec(quantization="fp4")


def test_unknown_setting_lists_known_ones(tmp_path):
    cfg = tmp_path / "x.toml"
    cfg.write_text("[data]\nuserz = 3\n")
    with pytest.raises(ValueError, match=r"x.toml: unknown setting data.userz; known settings here: .*users"):
        load_experiment(cfg)


def test_overrides_and_round_trip(tmp_path):
    spec = load_experiment(None, ["data.users=7", 'methods=["OPPU"]', "retrieval.k=3"])
    assert spec.data.users == 7 and spec.methods == ("OPPU",) and spec.retrieval.k == 3
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(to_dict(spec)))
    assert load_experiment(path) == spec


def test_wrong_type_is_named():
    with pytest.raises(ValueError, match=r"data.users must be a number"):
        load_experiment(None, ['data.users="many"'])
