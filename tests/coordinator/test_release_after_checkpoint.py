"""Release only after the checkpoint: no message carries a base adapter that is not already in the
durable checkpoint, together with an accountant that paid for every round up to it. The
coordinator is made to fail (an exception in process, which is what a kill leaves behind: the
state on disk) at each step between aggregation and the next round, restarted each time, and
every train and evaluate message it sends is checked against the checkpoint on disk at the
moment it is sent."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

import inprocess_federation as fedkit

DP = ["privacy.federate_base_adapter=true", "privacy.noise_multiplier=1.0", "privacy.clipping_norm=0.5",
      "federation.rounds=3", "data.users=2", "federation.evaluate_every=1", 'methods=["non-personalized"]',
      "federation.personal_refresh_epochs=0", "federation.sampling_seed=0", "federation.report_client_metrics=true"]


class Killed(RuntimeError):
    """What the injected failure raises (standing for SIGKILL at that point)."""


def _digests(arrays):
    return {hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest() for a in arrays}


def _adapter_digests(directory):
    from safetensors.numpy import load_file

    return _digests(load_file(str(directory / "adapter_model.safetensors")).values())


def test_no_adapter_leaves_before_its_checkpoint_under_failures_at_every_step(tmp_path, tiny_model_dir, monkeypatch):
    from coordinator import checkpoint, strategy
    from coordinator import run as coordinator_run
    from shared.privacy import Accountant
    from shared.protocol import ARRAYS

    run = tmp_path / "run"
    spec = fedkit.tiny_spec(tiny_model_dir, run, *DP)
    _, names = fedkit.prepare(spec, run)
    grid = fedkit.local_grid(spec, run, names)
    armed: dict[str, int] = {}  # injection point -> calls to let through before failing
    fired: list[str] = []
    checked: list[tuple[str, int]] = []

    def trip(point: str) -> None:
        if point in armed:
            if armed[point] == 0:
                del armed[point]
                fired.append(point)
                raise Killed(point)
            armed[point] -= 1

    # Every message that carries the base adapter is checked against the checkpoint on disk.
    real_send = grid.send_and_receive

    def send_and_receive(messages, **kw):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type not in ("train", "evaluate") or ARRAYS not in m.content.array_records:
                continue
            sent = _digests(a.numpy() for a in m.content[ARRAYS].values())
            ckpt = checkpoint.load(run / "checkpoint")
            if ckpt is None:  # before round 1 is checkpointed only the initial adapter may leave
                assert sent <= _adapter_digests(run / "artifacts" / "base-adapter-init"), "unaccounted release"
                checked.append((m.metadata.message_type, 0))
                continue
            assert sent <= _adapter_digests(ckpt.base_adapter_dir), (
                f"a {m.metadata.message_type} message carries an adapter that is not the checkpoint's (round {ckpt.round})")
            assert Accountant.from_state_dict(ckpt.accountant).steps == ckpt.round, "a checkpointed round not accounted"
            checked.append((m.metadata.message_type, ckpt.round))
        replies = real_send(messages, **kw)
        if any(m.metadata.message_type == "evaluate" for m in messages):
            trip("after an evaluate message left")
        if any(m.metadata.message_type == "train" for m in messages):
            trip("after the train messages left")
        return replies

    grid.send_and_receive = send_and_receive

    real_apply, real_record, real_evaluate = (coordinator_run.Coordinator._apply, strategy.Accounting.record,
                                              coordinator_run.Coordinator._evaluate)
    real_atomic_dir = checkpoint.atomic_dir

    def apply(self, new):
        trip("aggregated, before the adapter is applied")
        real_apply(self, new)
        trip("applied, before it is accounted")

    def record(self, *args, **kw):
        real_record(self, *args, **kw)
        trip("accounted, before the checkpoint")

    def evaluate(self, grid_, methods, rnd, **kw):
        if rnd > 0 and not kw.get("final"):
            trip("checkpointed, before the round's evaluation")
        return real_evaluate(self, grid_, methods, rnd, **kw)

    def atomic_dir(target, fill):
        if armed.get("checkpoint half written") == 0:
            def half(tmp):
                fill(tmp)
                trip("checkpoint half written")
            return real_atomic_dir(target, half)
        if armed.get("checkpoint written, between its two renames") == 0:
            # What a kill between atomic_dir's two renames leaves: the new checkpoint complete in
            # its temporary directory, the previous one renamed aside (another process's pid).
            fill(Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)))
            if target.exists():
                os.replace(target, target.with_name(f".{target.name}.old-{os.getpid() + 1}"))
            trip("checkpoint written, between its two renames")
        return real_atomic_dir(target, fill)

    monkeypatch.setattr(coordinator_run.Coordinator, "_apply", apply)
    monkeypatch.setattr(strategy.Accounting, "record", record)
    monkeypatch.setattr(coordinator_run.Coordinator, "_evaluate", evaluate)
    monkeypatch.setattr(checkpoint, "atomic_dir", atomic_dir)

    # One failure per start, in the order a round meets them; the last start runs to the end.
    plan = ["aggregated, before the adapter is applied", "applied, before it is accounted",
            "accounted, before the checkpoint", "checkpoint half written",
            "checkpoint written, between its two renames", "checkpointed, before the round's evaluation",
            "after an evaluate message left", "after the train messages left"]
    summary = None
    for attempt in range(len(plan) + 1):
        if attempt < len(plan):
            armed.clear()
            armed[plan[attempt]] = 0
        try:
            summary = fedkit.run(spec, run, grid)
        except Killed:
            continue
        break
    assert fired == plan, fired
    assert summary is not None and summary["status"] == "completed"
    final = checkpoint.load(run / "checkpoint")
    assert [h["round"] for h in final.history] == [1, 2, 3]
    # Every released round was accounted exactly once, and the report's epsilon is that ledger's.
    ledger = Accountant.from_state_dict(final.accountant)
    assert ledger.steps == 3 and summary["epsilon"] == pytest.approx(ledger.epsilon(delta=1e-5))
    rounds_checked = {r for t, r in checked if t == "train"}
    assert {0, 1, 2} <= rounds_checked and any(t == "evaluate" and r >= 1 for t, r in checked)
