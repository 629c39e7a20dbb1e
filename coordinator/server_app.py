"""Flower ServerApp: parse the run-config once, then hand over to the coordinator
(coordinator/run.py). The same app runs under the simulation engine and a SuperLink."""

from __future__ import annotations

from shared import environment

environment.apply()  # before Flower is imported: its telemetry and update check reach the network

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from shared.config import from_run_config

from .run import Coordinator

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    spec = from_run_config(context.run_config)
    Coordinator(spec).run(grid)
