"""A simulated round's personal phase (coordinator/cohorts.py): the sampled simulated users go in
cohorts of at most train.users_per_pass, each cohort to one worker (query.personalize), and
their train messages then carry no personal methods. The whole coordinator over an in-process
grid of simulated users (partition ids), tiny model."""

import inprocess_federation as fedkit
from coordinator.cohorts import cohorts
from coordinator.sampling import NodeNames
from localgrid import LocalGrid
from shared.protocol import PERSONALIZE, RoundConfig

CFG = RoundConfig(server_round=1, task="synthetic-tag", model="a" * 64, base_adapter="b" * 64,
                  methods="non-personalized,OPPU")


def _names(simulated, deployed=()):
    names = NodeNames(timeout=1)
    names.keys = {**{n: (0, pid) for pid, n in enumerate(simulated)}, **{n: (1, n) for n in deployed}}
    return names


def test_cohorts_are_even_hold_only_simulated_users_and_apply_only_where_a_pass_can_hold_several(tiny_model_dir, tmp_path):
    spec = fedkit.tiny_spec(tiny_model_dir, tmp_path, "personal_train.users_per_pass=4")
    sim = [11, 12, 13, 14, 15, 16, 17]
    names = _names(sim, deployed=[90, 91])
    assert cohorts(spec, names, [90, *sim, 91], CFG) == [[11, 12, 13, 14], [15, 16, 17]]
    assert cohorts(spec, names, sim[:5], CFG) == [[11, 12, 13], [14, 15]]  # 3 + 2, not 4 + 1
    assert cohorts(spec, names, [11, 90, 91], CFG) == []  # one simulated user: its train message trains it
    for off in (["personal_train.users_per_pass=1"], ["federation.secagg=true", "privacy.federate_base_adapter=true"],
                ['privacy.record_level="personal"'], ['personal_adapter.peft_type="ia3"', 'base_adapter.peft_type="ia3"']):
        other = fedkit.tiny_spec(tiny_model_dir, tmp_path, "personal_train.users_per_pass=4", *off)
        assert cohorts(other, names, sim, CFG) == [], off
    no_personal = RoundConfig(server_round=1, task="synthetic-tag", model="a" * 64, base_adapter="b" * 64,
                              methods="non-personalized,RAG")
    assert cohorts(spec, names, sim, no_personal) == []


def test_a_simulated_round_trains_each_cohort_in_one_message_and_not_again(tiny_model_dir, tmp_path):
    from shared.config import to_run_config

    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "data.users=4", "federation.rounds=1", "personal_train.users_per_pass=2",
                            'methods=["non-personalized", "OPPU"]', 'federation.base_init="fresh"', "data.queries=1")
    _, names = fedkit.prepare(spec, run)
    nodes = {700 + pid: {"partition-id": pid} for pid in range(4)}
    grid = fedkit.local_grid(spec, run, names)  # for its client app
    grid = LocalGrid(grid.client_app, nodes, to_run_config(spec))
    summary = fedkit.run(spec, run, grid)

    assert summary["status"] == "completed"
    sent = [(node, kind) for node, kind, _ in grid.outbox]
    assert sorted(n for n, kind in sent if kind == PERSONALIZE) == [700, 702]  # two cohorts of two, one message each
    assert sorted(n for n, kind in sent if kind == "train") == [700, 701, 702, 703]  # everyone's base update
    personal = summary["rounds"][0]["personal"]
    assert personal["cohorts"] == 2 and personal["users"] == 4 and personal["personal-plain-loss"] > 0
    assert "personal-plain-loss" not in summary["rounds"][0]["train"]  # the train messages trained none
    for name in names:  # published once, in the personal phase; not retrained by the train message
        user = run / "users" / name
        assert (user / "personal-plain" / "CURRENT").read_text().strip() == "v000001"
        assert not (user / "personal-plain" / "v000002").exists()
        assert (user / "predictions.json").is_file()
