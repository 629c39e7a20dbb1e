import pytest

from shared.config import AdapterSpec, BaseModelSpec, ExperimentSpec, load_experiment, dump_toml, to_dict


def test_adapter_follows_the_paper_and_the_personal_recipe_the_sweeps_chose():
    a = AdapterSpec()
    assert (a.peft_type, a.r, a.alpha, a.dropout, a.target_modules) == ("lora", 8, 8, 0.05, ("q_proj", "v_proj"))
    e = ExperimentSpec()
    # amazon-title's cross-fitted choice among recipes of at most 2 epochs (docs/sweep-personal-amazon-title.md)
    assert e.personal_train.epochs == 2 and e.personal_train.lr == 1e-3
    assert (e.selection.checks, e.selection.adopt, e.selection.scored_checks) == (1, "better", 1)
    paper = load_experiment(None, ["personal_train.lr=1e-4", "personal_train.epochs=2"])
    assert (paper.personal_train.epochs, paper.personal_train.lr) == (2, 1e-4)


def test_a_section_keeps_the_experiments_defaults_for_what_it_does_not_name(tmp_path):
    # personal_train and base_train share TrainSpec but not its defaults: naming one key of a
    # section must not reset the others to TrainSpec's.
    e = load_experiment(None, ["personal_train.users_per_pass=1", "base_train.batch_size=8"])
    d = ExperimentSpec()
    assert (e.personal_train.lr, e.personal_train.epochs, e.personal_train.users_per_pass) == (
        d.personal_train.lr, d.personal_train.epochs, 1)
    assert (e.base_train.lr, e.base_train.epochs, e.base_train.batch_size) == (d.base_train.lr, d.base_train.epochs, 8)
    cfg = tmp_path / "x.toml"
    cfg.write_text("[personal_train]\nseed = 3\n")
    assert load_experiment(cfg).personal_train == d.personal_train.__class__(**{**vars(d.personal_train), "seed": 3})


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
