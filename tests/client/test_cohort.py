"""A simulation worker trains several sampled users' personal adapters in one pass
(query.personalize, client/cohort.py; issue 18 item 1): each user's adapter, selection record and
recorded base adapter are what the user's own train message gives it alone. Tiny random model,
three synthetic users laid out as `oppu simulate` lays them out."""

import json

import numpy as np
import pytest
import torch

import client.rounds as rounds
import inprocess_federation as fedkit
from client import cohort
from client.artifacts import ArtifactCache
from client.personal import PersonalAdapters
from client.userdir import UserDir
from shared.protocol import KIND_MODEL, ClientError, RoundConfig, manifest_for_dir

USERS = 3
# Dropout off: in a group pass a user's dropout masks come from a shared stream (shared/group_training.py).
OVERRIDES = (f"data.users={USERS}", "personal_adapter.dropout=0.0", "base_adapter.dropout=0.0",
             "personal_train.epochs=2", "personal_train.lr=1e-3")


@pytest.fixture(scope="module")
def runtime():
    saved, rounds.RUNTIME = rounds.RUNTIME, rounds.NodeRuntime()
    yield rounds.RUNTIME
    rounds.RUNTIME = saved


def _run(tmp_path, tiny_model_dir, name, *overrides):
    """A run directory with USERS simulated users and a client cache holding the model artifact;
    returns (a node of that run, model id)."""
    run = tmp_path / name
    spec = fedkit.tiny_spec(tiny_model_dir, run, *OVERRIDES, *overrides)
    _, names = fedkit.prepare(spec, run)
    model_id = manifest_for_dir(tiny_model_dir, KIND_MODEL).id
    (run / "client-cache").mkdir(parents=True)
    (run / "client-cache" / model_id).symlink_to(tiny_model_dir, target_is_directory=True)
    node = rounds.Node(spec, UserDir(run / "users" / names[0]), ArtifactCache(run / "client-cache"), simulated=True)
    return node, model_id


def _round_base(node, model_id):
    """The coordinator's base adapter of the round: trained-looking (B nonzero), as arrays."""
    engine = rounds.engine_for(node, model_id)
    g = np.random.default_rng(3)
    return {k: v.detach().float().cpu().numpy() + (0.05 * g.standard_normal(v.shape)).astype(np.float32)
            if ".lora_B." in k else v.detach().float().cpu().numpy().copy() for k, v in engine.base_state().items()}


def _published(node, pid):
    user = cohort.peer(node, pid)
    found, _ = PersonalAdapters(user.user.personal_root("plain")).resolve()
    selection = json.loads((user.user.path / "federation" / "selection-plain.json").read_text())
    return found, selection


def _weights(found):
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(found.path / "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("selection", ["true", "false"])
def test_a_worker_trains_a_cohort_in_one_pass_as_each_user_alone(selection, tmp_path, tiny_model_dir, runtime,
                                                                 monkeypatch):
    """selection on: the per-user hold-out, checkpoint scores and decision (6 items: 2 held out, 4
    trained on; the random tiny model rarely beats its base, so the adapters are compared with it off,
    where every user's is adopted)."""
    cfg_for = lambda model_id: RoundConfig(server_round=1, task="synthetic-tag", model=model_id,  # noqa: E731
                                           base_adapter="b" * 64, methods="non-personalized,OPPU")
    # One at a time: each user's own train message (today's path).
    alone_node, model_id = _run(tmp_path, tiny_model_dir, "alone", f"selection.enabled={selection}")
    arrays = _round_base(alone_node, model_id)
    for pid in range(USERS):
        rounds.train(cohort.peer(alone_node, pid), cfg_for(model_id), arrays)

    # Together: one query.personalize for the three, in one group pass.
    node, _ = _run(tmp_path, tiny_model_dir, "together", f"selection.enabled={selection}",
                   f"personal_train.users_per_pass={USERS}")
    engine = rounds.engine_for(node, model_id)
    passes = []
    group_train = engine.train_personal_group
    monkeypatch.setattr(engine, "train_personal_group",
                        lambda users, *a, **kw: passes.append(len(users)) or group_train(users, *a, **kw))
    metrics = cohort.personalize_cohort(node, cfg_for(model_id), arrays, list(range(USERS)))
    assert passes and sum(passes) <= USERS and max(passes) >= 2, passes  # users went through one pass together
    assert metrics["personal-users"] == USERS and metrics["personal-together"] == USERS
    assert np.isfinite(metrics.get("personal-plain-loss", 0.0))

    tol = 1e-4 if engine.base.model.dtype == torch.float32 else 0.06  # as tests/shared/test_group_training.py
    init = {k: v.float() for k, v in engine._personal_init.items()}
    adopted, checked = 0, 0
    for pid in range(USERS):
        (found_a, sel_a), (found_t, sel_t) = _published(alone_node, pid), _published(node, pid)
        assert (sel_t["adopted"], sel_t["train_items"], sel_t["validation_items"]) == \
            (sel_a["adopted"], sel_a["train_items"], sel_a["validation_items"]), (pid, sel_a["reason"], sel_t["reason"])
        assert [c["step"] for c in sel_t["checks"]] == [c["step"] for c in sel_a["checks"]]
        checked += len(sel_a["checks"])
        for ca, ct in zip(sel_a["checks"], sel_t["checks"]):
            assert abs(ca["loss"] - ct["loss"]) <= tol * max(1.0, abs(ca["loss"])), (pid, ca, ct)
        assert (found_a is None) == (found_t is None) == (not sel_a["adopted"])
        if found_a is None:
            continue
        adopted += 1
        a, t = _weights(found_a), _weights(found_t)
        gap = sum(float((a[k] - t[k]).norm() ** 2) for k in a) ** 0.5
        moved = sum(float((a[k] - init[k].to(a[k].device)).norm() ** 2) for k in a if k in init) ** 0.5
        assert moved > 0 and gap / moved <= tol, (pid, gap / moved)
        # Published as its own train message publishes it: the same base adapter recorded.
        assert found_t.manifest.train["base_adapter"] == found_a.manifest.train["base_adapter"] != "unknown"
        assert found_t.manifest.train["refreshed"] is False
    if selection == "true":
        assert checked >= USERS, "no checkpoint was scored: nothing was compared"
        return
    assert adopted == USERS
    # The next round refreshes the published adapters (personal_refresh_epochs): each alone, in
    # this worker, continued from its own published one.
    passes.clear()
    again = RoundConfig(server_round=2, task="synthetic-tag", model=model_id, base_adapter="b" * 64, methods="OPPU")
    metrics = cohort.personalize_cohort(node, again, arrays, list(range(USERS)))
    assert passes == [] and metrics["personal-together"] == 0 and np.isfinite(metrics["personal-plain-loss"])
    for pid in range(USERS):
        found, _ = _published(node, pid)
        assert found.version == 2 and found.manifest.train["refreshed"] is True


def test_a_deployed_client_refuses_to_train_other_users(tmp_path, tiny_model_dir, runtime):
    node, model_id = _run(tmp_path, tiny_model_dir, "deployed")
    deployed = rounds.Node(node.spec, node.user, node.cache, simulated=False)
    cfg = RoundConfig(server_round=1, task="synthetic-tag", model=model_id, base_adapter="b" * 64, methods="OPPU")
    with pytest.raises(ClientError, match="a deployed client holds one user's data"):
        cohort.personalize_cohort(deployed, cfg, {}, [0, 1])
    assert not (node.user.path / "personal-plain").exists()
