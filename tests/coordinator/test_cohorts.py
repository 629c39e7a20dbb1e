"""A simulated round's personal phase (coordinator/cohorts.py): the sampled simulated users go in
cohorts of at most train.users_per_pass, each cohort to one worker (query.personalize), and
their train messages then carry no personal methods. The whole coordinator over an in-process
grid of simulated users (partition ids), tiny model."""

import inprocess_federation as fedkit
from coordinator.cohorts import cohorts, split, workers
from coordinator.sampling import NodeNames
from localgrid import LocalGrid
from shared.protocol import PERSONALIZE, RoundConfig

CFG = RoundConfig(server_round=1, task="synthetic-tag", model="a" * 64, base_adapter="b" * 64,
                  methods="non-personalized,OPPU")


def _names(simulated, deployed=()):
    names = NodeNames(timeout=1)
    names.keys = {**{n: (0, pid) for pid, n in enumerate(simulated)}, **{n: (1, n) for n in deployed}}
    return names


def test_cohorts_keep_every_worker_busy():
    """As many cohorts as workers where the users allow: 2 users on 2 workers train in parallel,
    each in its own train message, not one after the other in one cohort."""
    users = list(range(8))
    assert split(users, 4, workers=1) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split(users, 4, workers=4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split(users[:2], 4, workers=2) == [] and split(users[:2], 4, workers=1) == [[0, 1]]
    assert split(users[:3], 4, workers=2) == [[0, 1]]  # user 2 trains in its train message, on the other worker
    assert split(users, 1, workers=1) == []


def test_the_workers_are_this_machines_cores_over_the_clients_share_or_unknown_on_a_cluster(tiny_model_dir, tmp_path,
                                                                                            monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert workers(fedkit.tiny_spec(tiny_model_dir, tmp_path, "federation.sim_client_cpus=4")) == 4
    assert workers(fedkit.tiny_spec(tiny_model_dir, tmp_path, "federation.sim_client_cpus=32")) == 1
    assert workers(fedkit.tiny_spec(tiny_model_dir, tmp_path, 'federation.ray_address="auto"')) is None


def test_cohorts_are_even_hold_only_simulated_users_and_apply_only_where_a_pass_can_hold_several(tiny_model_dir, tmp_path):
    # One worker on any machine (sim_client_cpus above its cores): cohorts sized by users_per_pass alone.
    spec = fedkit.tiny_spec(tiny_model_dir, tmp_path, "personal_train.users_per_pass=4", "federation.sim_client_cpus=4096")
    sim = [11, 12, 13, 14, 15, 16, 17]
    names = _names(sim, deployed=[90, 91])
    assert cohorts(spec, names, [90, *sim, 91], CFG) == [[11, 12, 13, 14], [15, 16, 17]]
    assert cohorts(spec, names, sim[:5], CFG) == [[11, 12, 13], [14, 15]]  # 3 + 2, not 4 + 1
    assert cohorts(spec, names, [11, 90, 91], CFG) == []  # one simulated user: its train message trains it
    for off in (["personal_train.users_per_pass=1"], ["federation.secagg=true", "privacy.federate_base_adapter=true"],
                ['privacy.record_level="personal"'], ['personal_adapter.peft_type="ia3"', 'base_adapter.peft_type="ia3"']):
        other = fedkit.tiny_spec(tiny_model_dir, tmp_path, "personal_train.users_per_pass=4",
                                 "federation.sim_client_cpus=4096", *off)
        assert cohorts(other, names, sim, CFG) == [], off
    no_personal = RoundConfig(server_round=1, task="synthetic-tag", model="a" * 64, base_adapter="b" * 64,
                              methods="non-personalized,RAG")
    assert cohorts(spec, names, sim, no_personal) == []


def test_a_simulated_round_trains_each_cohort_in_one_message_and_not_again(tiny_model_dir, tmp_path):
    from shared.config import to_run_config

    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, "data.users=4", "federation.rounds=1", "personal_train.users_per_pass=2",
                            "federation.sim_client_cpus=4096",  # one worker on any machine: two cohorts of two
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
