"""Helpers for the federation tests: a tiny federated run over simulated users, in process.

The coordinator and the ClientApp are the real ones; tests/localgrid.py (LocalGrid) carries
the messages (serialized to Flower's wire objects and back) instead of Ray or a SuperLink.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

BASE_OVERRIDES = [
    'base_model.quantization="none"', 'data.task="synthetic-tag"', 'data.source="synthetic"', "data.users=3",
    "data.base_users=3", "data.queries=2", "data.min_history=6", "data.max_history=6", "data.base_examples=12",
    'retrieval.store="memory"', "retrieval.k=1", "retrieval.profile_max_tokens=6", "personal_train.epochs=1",
    "personal_train.batch_size=4", "base_train.batch_size=4", 'methods=["non-personalized", "RAG", "OPPU", "OPPU+RAG"]',
    "federation.rounds=2", "federation.chunk_mb=4", "federation.evaluate_every=0", "federation.round_timeout=120",
    # Rounds and publication are under test, on a random tiny model: every personal adapter is
    # adopted (adoption in a round: test_client_app.py::test_an_adapter_not_adopted_is_not_used).
    "selection.enabled=false",
]


def tiny_spec(model_dir: Path, run_dir: Path, *overrides: str) -> Any:
    from shared.config import load_federated

    return load_federated(None, [f'base_model.path="{model_dir}"', f'federation.run_dir="{run_dir}"',
                                 f'federation.client_cache="{run_dir / "client-cache"}"',
                                 *BASE_OVERRIDES, *overrides])


def prepare(spec: Any, run_dir: Path) -> tuple[Any, list[str]]:
    from simulations.simulate import prepare_users

    return prepare_users(spec, run_dir)


def local_grid(spec: Any, run_dir: Path, names: list[str], **kw: Any) -> Any:
    from client.client_app import app
    from localgrid import LocalGrid
    from shared.config import to_run_config

    # Each machine's own settings name the cache (here one, shared by the test's machines): a
    # deployed client never takes its cache path from the run config.
    nodes = {100 + i: {"data-dir": str(run_dir / "users" / n), "cache-dir": str(run_dir / "client-cache")}
             for i, n in enumerate(names)}
    return LocalGrid(app, nodes, to_run_config(spec), **kw)


def run(spec: Any, run_dir: Path, grid: Any) -> dict[str, Any]:
    from coordinator.run import Coordinator

    return Coordinator(spec, run_dir).run(grid)


def child(model_dir: Path, run_dir: Path, overrides: Sequence[str], *,
          stall_after_round: int | None = None) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of a tiny federated run in a process of its own, for the tests that
    kill the coordinator; with stall_after_round=N it hangs in the round after round N's checkpoint."""
    tests = Path(__file__).resolve().parent
    cmd = [sys.executable, str(tests / "inprocess_federation.py"), str(model_dir), str(run_dir), json.dumps(list(overrides))]
    if stall_after_round is not None:
        cmd.append(str(stall_after_round))
    return cmd, {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}


def _child_main(argv: list[str]) -> None:
    model_dir, run_dir = Path(argv[0]), Path(argv[1])
    spec = tiny_spec(model_dir, run_dir, *json.loads(argv[2]))
    _, names = prepare(spec, run_dir)
    grid = local_grid(spec, run_dir, names)
    if len(argv) > 3:
        stall_after, real = int(argv[3]), grid.send_and_receive

        def stalling(messages: Any, **kw: Any) -> Any:
            state = run_dir / "checkpoint" / "state.json"
            if state.exists() and json.loads(state.read_text())["round"] >= stall_after:
                time.sleep(600)  # the next round is under way: the test kills us here
            return real(messages, **kw)

        grid.send_and_receive = stalling
    run(spec, run_dir, grid)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
