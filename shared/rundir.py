"""Run directories: a new one per run, and the run's own log file while it runs.

Every command that writes results (experiment, federation, privacy ablation, study, sweep) gets
its directory and its log.txt from here, so runs are named and logged one way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Iterator

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """A new directory `out_dir/<YYYYmmdd-HHMMSS>-<name>` (`-2`, `-3`, ... when taken), created
    here so that two runs started in the same second never share one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(out_dir) / f"{stamp}-{name}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


@contextlib.contextmanager
def run_log(run_dir: Path, *, level: int = logging.INFO) -> Iterator[Path]:
    """Everything logged while the block runs also goes to `run_dir/log.txt`, at `level` and
    above whatever the console shows (oppu's own loggers are lowered to `level` if needed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(level)
    root, ours = logging.getLogger(), logging.getLogger("oppu")
    saved = (root.level, ours.level)
    root.addHandler(handler)
    if root.getEffectiveLevel() > level:
        root.setLevel(level)
    if ours.getEffectiveLevel() > level:
        ours.setLevel(level)
    try:
        yield run_dir / "log.txt"
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(saved[0])
        ours.setLevel(saved[1])
