"""The coordinator checkpoints the base adapter, round, accountant state and config atomically
each round; killed (SIGKILL) during round 3, a restarted coordinator resumes at round 3 with the
accountant state of round 2."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import inprocess_federation as fedkit
from shared.privacy import Accountant

DP = ["privacy.federate_base_adapter=true", "privacy.noise_multiplier=1.0", "privacy.clipping_norm=0.5",
      "federation.rounds=3", "data.users=3", "federation.fraction_train=0.67", 'methods=["non-personalized"]']


def test_killed_after_round_2_resumes_at_round_3_with_the_same_accountant(tmp_path, tiny_model_dir, caplog):
    run = tmp_path / "run"
    cmd, env = fedkit.child(tiny_model_dir, run, DP, stall_after_round=2)  # killed in round 3
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    state = run / "checkpoint" / "state.json"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if state.exists() and json.loads(state.read_text())["round"] == 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        else:
            raise AssertionError("the coordinator did not reach round 2 in time")
        time.sleep(1.0)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    saved = json.loads(state.read_text())
    assert saved["round"] == 2 and len(saved["history"]) == 2
    acc2 = Accountant.from_state_dict(saved["accountant"])
    assert acc2.steps == 2 and saved["history"][1]["epsilon"] == acc2.epsilon(delta=1e-5)

    spec = fedkit.tiny_spec(tiny_model_dir, run, *DP)
    _, names = fedkit.prepare(spec, run)
    with caplog.at_level("INFO", logger="oppu.coordinator"):
        summary = fedkit.run(spec, run, fedkit.local_grid(spec, run, names))
    assert "resuming from the checkpoint of round 2 (next round 3)" in caplog.text
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["rounds"][:2] == saved["history"]
    # DP with secret (unseeded) Poisson sampling: the round log counts the users, never names them.
    assert all("users" not in r and all(k.startswith("#") for k in {**r["failed"], **r["rejected"]})
               for r in summary["rounds"])
    assert "user-" not in (run / "report.md").read_text() and "node-" not in (run / "federation.json").read_text()
    # Round 3 composed exactly one more step (z, q) onto the saved accountant, whoever replied.
    r3 = summary["rounds"][2]
    acc2.step(noise_multiplier=1.0, sample_rate=r3["sample_rate"])
    final = json.loads(state.read_text())
    assert Accountant.from_state_dict(final["accountant"]) == acc2
    assert summary["epsilon"] == acc2.epsilon(delta=1e-5) > saved["history"][1]["epsilon"]

    # The same settings are required to resume; a change is refused with the differing field.
    other = fedkit.tiny_spec(tiny_model_dir, run, *DP, "privacy.noise_multiplier=2.0")
    try:
        fedkit.run(other, run, fedkit.local_grid(other, run, names))
    except ValueError as e:
        assert "privacy.noise_multiplier" in str(e)
    else:
        raise AssertionError("resuming with different privacy settings was accepted")


def _save_round(run: Path, rnd: int) -> Path:
    """A real checkpoint of round `rnd` (its base adapter a small file with its manifest)."""
    from coordinator import checkpoint
    from shared.adapters import AdapterManifest, write_adapter_dir

    def base(d):
        write_adapter_dir(d, lambda t: (t / "adapter_model.safetensors").write_bytes(b"w%d" % rnd),
                          AdapterManifest(role="base", base_model_hash="h", task="t", peft_type="lora"))

    ckpt = checkpoint.Checkpoint(round=rnd, accountant=None, history=[{"round": r} for r in range(1, rnd + 1)],
                                 config={})
    return checkpoint.save(run / "checkpoint", ckpt, base)


def test_resume_picks_the_highest_complete_round_not_the_first_name_and_removes_stale_copies(tmp_path):
    """Crashes between atomic_dir's two renames in earlier runs leave `.checkpoint.old-<pid>`
    copies of different rounds and no checkpoint/; the loader must not trust name order."""
    from coordinator import checkpoint

    run = tmp_path / "run"
    for rnd, pid in [(3, 100), (5, 99999), (7, 5)]:  # names sort as old-100 < old-5 < old-99999
        os.replace(_save_round(run, rnd), run / f".checkpoint.old-{pid}")
    bad = run / ".checkpoint.old-5" / "base_adapter" / "adapter_model.safetensors"
    bad.write_bytes(b"torn")  # round 7's copy is damaged: its adapter no longer matches its sha256
    (run / ".checkpoint.tmp-abc").mkdir()  # a copy that was never published
    ckpt = checkpoint.load(run / "checkpoint")
    assert ckpt is not None and ckpt.round == 5 and len(ckpt.history) == 5
    assert ckpt.directory == run / "checkpoint" and ckpt.base_adapter_dir.joinpath("adapter_model.safetensors").read_bytes() == b"w5"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]  # the stale copies are gone
    assert checkpoint.load(run / "checkpoint").round == 5  # and the next start agrees


def test_a_newer_complete_copy_wins_over_an_older_checkpoint_dir(tmp_path):
    from coordinator import checkpoint

    run = tmp_path / "run"
    os.replace(_save_round(run, 4), run / ".checkpoint.old-42")
    _save_round(run, 2)  # e.g. restored by hand from a backup
    assert checkpoint.load(run / "checkpoint").round == 4
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    assert json.loads((run / "checkpoint" / "state.json").read_text())["round"] == 4
