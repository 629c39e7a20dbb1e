"""Flower ServerApp: parse the run-config once, then hand over to the coordinator
(coordinator/federation.py). The same app runs under the simulation engine and a SuperLink."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from shared.config import from_run_config

    from .federation import Coordinator

    spec = from_run_config(context.run_config)
    Coordinator(spec).run(grid)
