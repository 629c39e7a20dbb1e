"""Helpers for the federation tests: a tiny federated run over simulated users, in process.

The coordinator and the ClientApp are the real ones; tests/localgrid.py (LocalGrid) carries
the messages (serialized to Flower's wire objects and back) instead of Ray or a SuperLink.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
