"""Waiting in tests for something another thread or process does: one polling helper for all."""

from __future__ import annotations

import time
from typing import Callable


def wait_for(predicate: Callable[[], object], timeout: float, what: str | Callable[[], str], *,
             every: float = 0.05) -> None:
    """Poll `predicate` every `every` seconds until it is true. After `timeout` seconds an
    AssertionError names `what`: a text, or a function giving one when it fails (a log's tail,
    read then)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(every)
