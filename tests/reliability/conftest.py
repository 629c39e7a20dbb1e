"""The reliability suite's figures: every test records what it did (load held, faults injected
and survived, bad inputs tried and refused, items lost); at the end of the session the figures
are written to docs/reliability.md (atomically), with the machine, the date and the test that
produced each one.

The file is rewritten only on request (OPPU_RELIABILITY_DOC=1, as `make reliability-doc` sets;
a test run must leave the working tree as it found it) and only when every fast test of this
directory was selected, so docs/reliability.md always describes a whole run. Otherwise the
figures go to OPPU_RELIABILITY_REPORT if set, else nowhere. Slow variants (`-m slow`, or OPPU_SOAK=1 for the long load test) add
their rows when they run and are listed as "not run" otherwise.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DOC = REPO / "docs" / "reliability.md"
SOAK = os.environ.get("OPPU_SOAK") == "1"


@dataclass
class Figures:
    load: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    bad_inputs: list[dict[str, Any]] = field(default_factory=list)
    access: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)  # test node id -> passed / failed
    selected: set[str] = field(default_factory=set)
    deselected_fast: list[str] = field(default_factory=list)
    slow_not_run: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)


FIGURES = Figures()


class Recorder:
    """What a test uses to report its figures (the `figures` fixture)."""

    def __init__(self, nodeid: str) -> None:
        self.test = nodeid

    def load(self, **row: Any) -> None:
        FIGURES.load.append({"test": self.test, **row})

    def fault(self, fault: str, *, how: str, survived: bool, acknowledged: int, lost: int,
              adapter_ok: bool | None = None, note: str = "") -> None:
        FIGURES.faults.append({"test": self.test, "fault": fault, "how": how, "survived": survived,
                               "acknowledged": acknowledged, "lost": lost, "adapter_ok": adapter_ok, "note": note})

    def bad_inputs(self, area: str, *, tried: int, refused: int, changed: int | None, accepted_valid: int = 0,
                   how: str = "") -> None:
        """`changed`: how many refused inputs changed stored state, counted from snapshots taken
        before and after each (tests/reliability/stored_state.py); None where nothing that could
        store the input was in reach (shown as "not measured", never as 0)."""
        FIGURES.bad_inputs.append({"test": self.test, "area": area, "tried": tried, "refused": refused,
                                   "accepted_valid": accepted_valid, "changed": changed, "how": how})

    def access(self, check: str, result: str) -> None:
        FIGURES.access.append({"test": self.test, "check": check, "result": result})


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Recorder:
    return Recorder(request.node.nodeid)


def _mine(item: pytest.Item) -> bool:
    return Path(str(item.fspath)).resolve().is_relative_to(HERE)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _mine(item):
            item.add_marker(pytest.mark.reliability)


@pytest.hookimpl(trylast=True)
def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        if _mine(item):
            if item.get_closest_marker("slow"):
                FIGURES.slow_not_run.append(item.nodeid)
            else:
                FIGURES.deselected_fast.append(item.nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.nodeid.startswith("tests/reliability/"):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        prev = FIGURES.outcomes.get(report.nodeid)
        if prev != "failed":
            FIGURES.outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not FIGURES.outcomes:
        return
    if session.config.getoption("collectonly", False):
        return
    # A whole run: every test file of this directory ran, or was left out only as slow.
    covered = {nodeid.split("::")[0] for nodeid in [*FIGURES.outcomes, *FIGURES.slow_not_run]}
    all_files = {p.relative_to(REPO).as_posix() for p in HERE.glob("test_*.py")}
    target: Path | None = None
    if os.environ.get("OPPU_RELIABILITY_DOC") == "1" and not FIGURES.deselected_fast and covered >= all_files:
        target = DOC
    elif os.environ.get("OPPU_RELIABILITY_REPORT"):
        target = Path(os.environ["OPPU_RELIABILITY_REPORT"])
    if target is None:
        return
    from shared.fileio import atomic_write

    atomic_write(target, render())
    session.config.pluginmanager.get_plugin("terminalreporter").write_line(f"reliability figures written to {target}")


# ------------------------------------------------------------------------------------ report


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def _ok(test: str) -> str:
    """The outcome of the test(s) a figure came from ("file.py::a, b" names several)."""
    module, _, names = test.partition("::")
    ids = [f"{module}::{n.strip()}" for n in names.split(",")] if names else [test]
    seen = [FIGURES.outcomes.get(i, "") for i in ids]
    if "failed" in seen:
        return "**FAILED**"
    if all(o == "passed" for o in seen):
        return "passed"
    return "skipped" if "skipped" in seen else "?"


def _short(test: str) -> str:
    return test.replace("tests/reliability/", "")


def _changed_summary(rows: list[dict[str, Any]]) -> str:
    measured = [r for r in rows if r["changed"] is not None]
    text = f"{sum(r['changed'] for r in measured)} of {sum(r['refused'] for r in measured)} measured"
    unmeasured = sum(r["refused"] for r in rows if r["changed"] is None)
    return text + (f" ({unmeasured} refused by parsers with no store in reach: not measured)" if unmeasured else "")


def render() -> str:
    f = FIGURES
    out = ["# Reliability and security figures", "",
           "Generated by the reliability suite (`tests/reliability/`, run by `make test`; slow variants by "
           "`make test-all`, the long soak with `OPPU_SOAK=1`). Do not edit by hand: run the suite.", "",
           f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(f.started))}",
           f"- Machine: {_machine()}",
           f"- Tests: {sum(1 for o in f.outcomes.values() if o == 'passed')} passed, "
           f"{sum(1 for o in f.outcomes.values() if o == 'failed')} failed, "
           f"{sum(1 for o in f.outcomes.values() if o == 'skipped')} skipped; "
           f"{time.time() - f.started:.0f} s", ""]
    lost = sum(r["lost"] for r in f.faults) + sum(r.get("lost", 0) for r in f.load)
    out += ["## Summary", "",
            "| figure | value |", "|---|---|",
            f"| faults injected / survived | {len(f.faults)} / {sum(1 for r in f.faults if r['survived'])} |",
            f"| acknowledged items lost (faults and load) | {lost} |",
            f"| bad inputs tried / refused with a clear error | {sum(r['tried'] - r['accepted_valid'] for r in f.bad_inputs)}"
            f" / {sum(r['refused'] for r in f.bad_inputs)} (plus {sum(r['accepted_valid'] for r in f.bad_inputs)} generated "
            "inputs that were valid and accepted) |",
            f"| refused inputs that changed stored state (snapshots before and after each) | "
            f"{_changed_summary(f.bad_inputs)} |"]
    for r in f.load:
        out.append(f"| load held ({_short(r['test'])}) | {r['clients']} concurrent clients for {r['seconds']:.0f} s: "
                   f"{r['requests']} requests, {r['errors']} errors, {r['lost']} lost, {r['duplicated']} duplicated |")
    out.append("")
    if f.load:
        out += ["## Load: the daemon API on loopback", "",
                "| test | clients | seconds | requests | adds (items) | asks | errors | items acknowledged | stored | "
                "lost | duplicated | add p50 / p95 / p99 ms | ask p50 / p95 / p99 ms | result |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in f.load:
            out.append(f"| {_short(r['test'])} | {r['clients']} | {r['seconds']:.0f} | {r['requests']} | {r['adds']} "
                       f"({r['items']}) | {r['asks']} | {r['errors']} | {r['acknowledged']} | {r['stored']} | {r['lost']} | "
                       f"{r['duplicated']} | {r['add_ms'][0]:.0f} / {r['add_ms'][1]:.0f} / {r['add_ms'][2]:.0f} | "
                       f"{r['ask_ms'][0]:.0f} / {r['ask_ms'][1]:.0f} / {r['ask_ms'][2]:.0f} | {_ok(r['test'])} |")
        out.append("")
    if f.faults:
        out += ["## Faults injected", "",
                "| fault | how it was injected | survived | acknowledged items | lost | previous adapter loadable | "
                "test | result |", "|---|---|---|---|---|---|---|---|"]
        for r in f.faults:
            adapter = {True: "yes", False: "**no**", None: "n/a"}[r["adapter_ok"]]
            note = f" {r['note']}" if r["note"] else ""
            out.append(f"| {r['fault']} | {r['how']}{note} | {'yes' if r['survived'] else '**no**'} | {r['acknowledged']} | "
                       f"{r['lost']} | {adapter} | {_short(r['test'])} | {_ok(r['test'])} |")
        out.append("")
    if f.bad_inputs:
        out += ["## Bad input", "",
                "Every refused input must leave what is stored unchanged. \"changed stored state\" is measured: "
                "each input goes on to what would store it, and the files, items, adapters and ledgers there are "
                "snapshotted before and after it (`tests/reliability/stored_state.py`); the column counts refused "
                "inputs whose snapshots differ (each such input also fails its test). \"not measured\": the test "
                "feeds a parser with nothing in reach that could store the input.", "",
                "| where it enters | inputs tried | refused with a clear error | valid, accepted | changed stored state | "
                "how | test | result |", "|---|---|---|---|---|---|---|---|"]
        for r in f.bad_inputs:
            changed = "not measured" if r["changed"] is None else r["changed"]
            out.append(f"| {r['area']} | {r['tried']} | {r['refused']} | {r['accepted_valid']} | {changed} | {r['how']} | "
                       f"{_short(r['test'])} | {_ok(r['test'])} |")
        out.append("")
    if f.access:
        out += ["## Access", "", "| check | result | test |", "|---|---|---|"]
        for r in f.access:
            out.append(f"| {r['check']} | {r['result']} | {_short(r['test'])} ({_ok(r['test'])}) |")
        out.append("")
    if f.slow_not_run:
        out += ["## Not run in this session", "",
                "Slow variants (run with `make test-all`, i.e. `pytest -m slow tests/reliability`):", ""]
        out += [f"- `{_short(t)}`" for t in sorted(set(f.slow_not_run))]
        out.append("")
    return "\n".join(out)
