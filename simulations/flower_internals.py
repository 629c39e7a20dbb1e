"""The one place oppu calls Flower's private simulation API, behind a version check.

`oppu simulate` needs what Flower's public `run_simulation` does not take: a run config and a
ServerApp context of its own (the run directory, the federation settings), and the app
directory that holds the generated pyproject. Flower's own `run_simulation` builds these with
private helpers (`_run_simulation`, `Run.create_empty`, `TaskIdentity`), which change between
minor releases; hence the `flwr==1.42.*` pin in pyproject.toml and the check below, which fails
with the installed and the supported version rather than with an AttributeError deep in a run.
(client/flower_internals.py is the client side's counterpart: the app gate's hook.)
"""

from __future__ import annotations

from typing import Any

from client import flower_internals as _client_side

SUPPORTED = _client_side.SUPPORTED  # one pinned minor release for both sides


def check_version() -> str:
    """The installed Flower version; RuntimeError naming it when these calls were not written for it."""
    return _client_side.check_version("oppu simulate", "simulations/flower_internals.py")


def new_run() -> Any:
    """A Run as Flower's own `run_simulation` makes one (it does not take a run config itself)."""
    check_version()
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    return run


def run_simulation(*, num_supernodes: int, client_app: Any, server_app: Any, backend_config: dict[str, Any],
                   app_dir: str, run: Any, server_app_context: Any, verbose: bool) -> None:
    """Flower's simulation engine (Ray backend) on our run, context and app directory."""
    check_version()
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    _run_simulation(num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    client_app=client_app, server_app=server_app, backend_name="ray",
                    backend_config=backend_config, app_dir=app_dir, run=run,
                    server_app_context=server_app_context, verbose_logging=verbose, is_app=True)
