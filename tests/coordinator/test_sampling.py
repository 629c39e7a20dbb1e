"""A round's users are chosen by names that survive a restart: simulated users (whose node ids
Flower draws at random every run) by partition id, deployed clients by node id. So a rerun of a
run directory with partial participation trains the same users and gets the same numbers."""

import json
import random

import inprocess_federation as fedkit
from localgrid import LocalGrid
from coordinator.sampling import NodeNames, sample


def _grid(node_configs, run_config=None):
    from client.client_app import app

    return LocalGrid(app, node_configs, run_config or {})


def _simulated(ids):
    """Virtual users 0..n-1 under the given node ids (as Flower's engine registers them)."""
    return _grid({node: {"partition-id": pid} for pid, node in enumerate(ids)})


def _picked(grid, rounds=6, m=2):
    names = NodeNames(timeout=5)
    pid = {n: c["partition-id"] for n, c in grid.node_configs.items()}
    out = []
    for rnd in range(1, rounds + 1):
        ordered = names.order(grid, grid.get_node_ids())
        out.append([pid[n] for n in sample(ordered, m, seed=0, rnd=rnd)])
    return out


def test_simulated_users_are_sampled_by_partition_id_whatever_their_node_ids():
    rng = random.Random(7)
    first = _simulated([rng.getrandbits(63) for _ in range(6)])
    again = _simulated([rng.getrandbits(63) for _ in range(6)])
    assert _picked(first) == _picked(again)
    # Control: sampling over the node ids themselves, as Flower assigns them, picks other users.
    def by_node_id(grid):
        pid = {n: c["partition-id"] for n, c in grid.node_configs.items()}
        ids = sorted(grid.get_node_ids())
        return [sorted(pid[n] for n in random.Random(f"0:{r}").sample(ids, 2)) for r in range(1, 7)]

    assert by_node_id(first) != by_node_id(again)


def test_each_node_is_asked_once_and_a_deployed_client_is_known_by_its_node_id(tmp_path):
    grid = _grid({30: {"data-dir": str(tmp_path / "a")}, 10: {"data-dir": str(tmp_path / "b")},
                  20: {"data-dir": str(tmp_path / "c")}})
    names = NodeNames(timeout=5)
    assert names.order(grid, [30, 10, 20]) == [10, 20, 30]
    assert names.keys == {10: (1, 10), 20: (1, 20), 30: (1, 30)}
    asked = len(grid.outbox)
    names.order(grid, [30, 10, 20])
    assert len(grid.outbox) == asked  # known nodes are not asked again
    # Nothing about the user travels: the reply is empty.
    assert all(t == "query.identify" for _, t, _ in grid.outbox)


def test_an_unanswered_identify_falls_back_to_the_node_id_and_is_asked_again():
    grid = _simulated([5, 9, 7])
    grid.fail.add(9)
    names = NodeNames(timeout=5)
    assert names.order(grid, grid.get_node_ids()) == [5, 7, 9]  # 5 and 7 by partition, 9 by node id
    assert 9 not in names.keys
    grid.fail.clear()
    assert names.order(grid, grid.get_node_ids()) == [5, 9, 7]  # partitions 0, 1, 2
    assert names.keys[9] == (0, 1)


def test_a_rerun_under_other_node_ids_samples_the_same_users_and_gets_the_same_numbers(tiny_model_dir, tmp_path):
    """The whole coordinator, twice, with half the users per round: same losses, same scores."""
    from shared.config import to_run_config

    summaries = []
    for attempt, ids in enumerate(([101, 102, 103, 104], [904, 903, 902, 901])):
        run = tmp_path / f"run{attempt}"
        spec = fedkit.tiny_spec(tiny_model_dir, run, "data.users=4", "federation.fraction_train=0.5",
                                "federation.rounds=2", 'methods=["non-personalized", "OPPU"]',
                                "privacy.federate_base_adapter=true")
        _, names = fedkit.prepare(spec, run)
        assert json.loads((run / "users" / "index.json").read_text()) == names
        grid = LocalGrid(_grid({}).client_app, {n: {"partition-id": i} for i, n in enumerate(ids)},
                         to_run_config(spec))
        summaries.append(fedkit.run(spec, run, grid))
        trained = [n for n, t, _ in grid.outbox if t == "train"]
        assert len(trained) == 4  # 2 of 4 users in each of 2 rounds
    first, again = summaries
    assert first["status"] == again["status"] == "completed"
    def numbers(summary):  # everything but the wall times
        return [{k: v for k, v in r["train"].items() if k != "seconds"} for r in summary["rounds"]]

    assert numbers(first) == numbers(again)
    assert [r["users"] for r in first["rounds"]] == [r["users"] for r in again["rounds"]]
    assert all(len(r["users"]) == 2 and all(u.startswith("user-") for u in r["users"]) for r in first["rounds"])
    assert first["final"] == again["final"]
