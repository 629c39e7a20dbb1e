"""`oppu ablate privacy`: the attack's AUC, the grid's cells, and a tiny grid end to end."""

import json
import math
import random

import pytest

from simulations.ablation_spec import load_ablation
from simulations.ablation import cells
from simulations.membership import auc, balanced, calibrated_auc, loss_attack_auc


def test_auc_of_separated_identical_and_reversed_scores():
    assert auc([5, 6, 7], [1, 2, 3]) == 1.0
    assert auc([1, 2, 3], [5, 6, 7]) == 0.0
    assert auc([2, 2, 2], [2, 2]) == 0.5
    assert auc([1, 3], [2, 2]) == 0.5  # one win, one loss over each negative


def test_auc_is_the_mann_whitney_probability():
    rng = random.Random(0)
    pos = [rng.choice([0.1, 0.2, 0.3, 0.5, 0.8]) for _ in range(40)]
    neg = [rng.choice([0.0, 0.2, 0.3, 0.4]) for _ in range(30)]
    brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auc(pos, neg) == pytest.approx(brute)


def test_loss_attack_calls_low_loss_a_member():
    assert loss_attack_auc([0.1, 0.2], [1.0, 2.0]) == 1.0
    assert loss_attack_auc([1.0, 2.0], [0.1, 0.2]) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        loss_attack_auc([], [1.0])


def test_calibrated_attack_scores_the_fall_in_loss_not_the_loss():
    # Members are hard records (high loss) whose loss fell; non-members are easy and did not move.
    before = {"member_losses": [3.0, 3.2], "nonmember_losses": [0.5, 0.6]}
    after = {"member_losses": [2.0, 2.1], "nonmember_losses": [0.5, 0.6]}
    assert loss_attack_auc(after["member_losses"], after["nonmember_losses"]) == 0.0  # fooled by difficulty
    assert calibrated_auc(after, before) == 1.0
    assert calibrated_auc(before, before) == 0.5  # nothing moved


def test_balanced_draws_equal_seeded_samples():
    m, n = balanced(list(range(10)), list(range(100, 103)), limit=8, seed=1)
    assert len(m) == len(n) == 3 and (m, n) == balanced(list(range(10)), list(range(100, 103)), limit=8, seed=1)


def test_one_at_a_time_grid_varies_one_axis_from_the_first_values():
    spec = load_ablation(None, ["grid.noise_multipliers=[0.0, 0.5, 2.0]", "grid.clipping_norms=[1.0, 0.1]",
                                "grid.clients_per_round=[2]", "grid.populations=[4, 8]",
                                "grid.federate_base_adapter=[true, false]", "grid.record_dp=[false, true]",
                                "grid.small_model_min_population=8"])
    grid = cells(spec)
    ref = grid[0]
    assert (ref["noise_multiplier"], ref["clipping_norm"], ref["population"], ref["federate_base_adapter"],
            ref["record_dp"]) == (0.0, 1.0, 4, True, False)
    assert len(grid) == 1 + 2 + 1 + 1 + 1 + 1 and [c["id"] for c in grid] == list(range(len(grid)))
    for c in grid[1:]:
        changed = [k for k in ("noise_multiplier", "clipping_norm", "population", "federate_base_adapter", "record_dp")
                   if c[k] != ref[k]]
        assert len(changed) == 1
    off = [c for c in grid if not c["federate_base_adapter"]]
    assert len(off) == 1 and off[0]["noise_multiplier"] == 0.0
    assert [c["small_model"] for c in grid] == [c["population"] >= 8 for c in grid]


def test_full_grid_crosses_the_axes_and_drops_duplicates():
    spec = load_ablation(None, ["grid.noise_multipliers=[0.0, 1.0]", "grid.populations=[4, 8]",
                                "grid.federate_base_adapter=[true, false]", "grid.record_dp=[false]",
                                'grid.layout="full"'])
    grid = cells(spec)
    # 2 noise x 2 populations federated, and 2 populations not federated (noise does not apply there)
    assert len(grid) == 6


def test_grid_errors_name_the_field():
    with pytest.raises(ValueError, match="grid.clients_per_round"):
        load_ablation(None, ["grid.clients_per_round=[5]", "grid.populations=[4]"])
    with pytest.raises(ValueError, match="grid.layout"):
        load_ablation(None, ['grid.layout="diagonal"'])
    with pytest.raises(ValueError, match=r"grid.noise_multipliers\[1\] must be a number"):
        load_ablation(None, ['grid.noise_multipliers=[0, "lots"]'])


def _tiny_grid_args(tiny_model_dir, run):
    args = ["ablate", "privacy", "--model", str(tiny_model_dir), "--quantization", "none", "--run-dir", str(run),
            "--noise", "0,1,8", "--populations", "2", "--clients", "1", "--rounds", "2", "--quiet"]
    for ov in ['data.task="synthetic-tag"', 'data.source="synthetic"', "data.base_users=2", "data.base_examples=4",
               "data.min_history=4", "data.max_history=4", "data.queries=1", "grid.holdout_users=1",
               "grid.mia_records=4", "grid.reference_users=1", "grid.federate_base_adapter=[true, false]",
               "grid.record_dp=[false]", "federation.local_train.epochs=1", "personal_train.epochs=1"]:
        args += ["--set", ov]
    return args


def test_tiny_grid_end_to_end(tiny_model_dir, tmp_path):
    from oppu.cli import main

    run = tmp_path / "ablation"
    assert main(_tiny_grid_args(tiny_model_dir, run)) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    by_z = {c["noise_multiplier"]: c for c in metrics["cells"] if c["federate_base_adapter"]}
    assert set(by_z) == {0.0, 1.0, 8.0}
    # Nothing shared: the base adapter never moves, so the attack learns nothing beyond the records.
    (off,) = [c for c in metrics["cells"] if not c["federate_base_adapter"]]
    assert off["epsilon"] == 0.0 and off["auc_base"] == off["auc_before"] and off["auc_gain"] == 0.0
    assert off["auc_calibrated"] == 0.5  # every record's loss moved by exactly 0
    assert by_z[0.0]["epsilon"] is None  # shared without noise
    assert by_z[0.0]["update_norm"] > 0  # the clients' updates really moved the shared adapter
    assert math.isfinite(by_z[1.0]["epsilon"]) and by_z[8.0]["epsilon"] < by_z[1.0]["epsilon"]
    for c in metrics["cells"]:
        assert 0.0 <= c["auc_base"] <= 1.0 and c["attack"]["members"] == c["attack"]["nonmembers"] > 0
        assert c["participants"] >= 1 or not c["federate_base_adapter"]
    assert 0.0 <= metrics["reference"]["auc"] <= 1.0
    for name in ("config.toml", "run.json", "metrics.md", "plots/tradeoff.png", "REPORT.md"):
        assert (run / name).is_file(), name
    assert load_ablation(run / "config.toml").grid.noise_multipliers == (0.0, 1.0, 8.0)
    assert "attack AUC (base)" in (run / "metrics.md").read_text()
    # The grid is seeded (reproducible), and its page says what that means for the epsilon.
    assert metrics["sampling_seed"] == 0 and all(c["sample_rate"] == 0.5 for c in metrics["cells"])
    assert "sampling seeded for reproducibility: the epsilon assumes the seed is secret" in (run / "REPORT.md").read_text()


@pytest.mark.slow
def test_ablation_rerun_reproduces_every_cell(tiny_model_dir, tmp_path):
    from oppu.cli import main

    run = tmp_path / "ablation"
    assert main(_tiny_grid_args(tiny_model_dir, run)) == 0
    assert main(["reproduce", str(run), "--into", str(tmp_path / "again"), "--quiet"]) == 0
    result = json.loads((tmp_path / "again" / "reproduce.json").read_text())
    assert result["reproduced"] and any(r["score"].endswith("auc_base") for r in result["rows"])
