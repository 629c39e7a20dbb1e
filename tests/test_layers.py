"""The layers of DESIGN.md hold: every project import, function-level ones included, goes down.

oppu/ (the command) may import anything; simulations/ imports client/, coordinator/ and shared/;
client/ and coordinator/ import only shared/ and never each other; shared/ imports nothing above
itself. A lazy import is still a dependency, so the walk reads every import statement.

Project imports sit at module top, so a module's header shows what it depends on; one inside a
function is allowed only where LAZY_PROJECT_IMPORTS says why (an import cycle, or a module that
would pull torch, chromadb or Flower into a path that does not need them).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "oppu": {"oppu", "simulations", "client", "coordinator", "shared"},
    "simulations": {"simulations", "client", "coordinator", "shared"},
    "client": {"client", "shared"},
    "coordinator": {"coordinator", "shared"},
    "shared": {"shared"},
}


def project_imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, imported project package) for every import in `path`, relative ones resolved."""
    module = path.relative_to(ROOT).with_suffix("").parts
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . / .. import: resolved against this module's package
                base = module[: len(module) - node.level]
                names = [".".join(base + tuple((node.module or "").split(".")))]
            else:
                names = [node.module or ""]
        else:
            continue
        out += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in ALLOWED]
    return out


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, target in project_imports(path, package):
                if target not in allowed:
                    bad.append(f"{path.relative_to(root)}:{line} imports {target}/ (allowed: {', '.join(sorted(allowed))})")
    return bad


ANY = "*"
# file (or folder/) -> (project modules it may import inside functions, or ANY; why). Keep it short.
LAZY_PROJECT_IMPORTS: dict[str, tuple[frozenset[str] | str, str]] = {
    "oppu/cli.py": (ANY, "the command: each subcommand imports its package when it runs, so `oppu --help` is "
                         "instant and light commands (tasks, import, client) never load torch, chromadb or Flower"),
    "client/cli.py": (frozenset({"client.commands"}),
                      "the client's parser (built for every `oppu --help`): a command's code (the daemon, httpx) loads "
                      "when it runs"),
    "client/daemon.py": (frozenset({"client.api", "client.service"}),
                         "the commands and the daemon's HTTP client import this module for its paths and identity "
                         "proof; fastapi and the model host load when the daemon starts"),
    "client/rounds.py": (frozenset({"shared.engine"}), "torch: a round's inventory and artifact messages need no model"),
    "coordinator/run.py": (frozenset({"shared.engine"}),
                           "torch: `oppu simulate --prepare-only` imports this module for federation_run_dir"),
    "shared/privacy.py": (frozenset({"shared.aggregation"}), "cycle: shared/aggregation.py imports this module"),
    "simulations/experiment.py": (frozenset({"client.store"}), "chromadb: only for retrieval.store = \"chroma\""),
    "simulations/simulate.py": (
        frozenset({"client.store", "client.client_app", "coordinator.server_app", "simulations.experiment",
                   "shared.engine"}),
        "chromadb only for store = \"chroma\"; Flower and torch only when a simulation runs (--prepare-only needs "
        "neither)"),
    "simulations/reports/run_outputs.py": (frozenset({"simulations.reports.page"}),
                                           "cycle: simulations/reports/page.py imports this module"),
    "client/service.py": (frozenset({"client.store", "shared.engine"}),
                          "chromadb and torch load when a daemon starts, not when client/api.py is imported"),
    "client/userdir.py": (frozenset({"client.store"}), "chromadb: only for a user's own history/ store"),
    "simulations/bench/run.py": (
        frozenset(f"simulations.bench.{m}" for m in ("training", "serving", "memory", "footprint", "comms",
                                                      "costcoeffs", "scaling")),
        "each section runs in a fresh process that imports only its own module: what it loads (torch, the "
        "engine) is part of what it measures (peak memory, costcoeffs' load_s)"),
    "simulations/bench/costcoeffs.py": (frozenset({"shared.engine", "client.rounds"}),
                                        "timed: a worker's import of torch, transformers and the client is part of "
                                        "the model load it pays (load_s)"),
}


def _imported_modules(node: ast.Import | ast.ImportFrom, module: tuple[str, ...]) -> list[str]:
    """Dotted names an import statement may load (`from a import b` loads a, and a.b when b is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        base = ".".join(module[: len(module) - node.level] + ((base,) if base else ()))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def function_level_imports(path: Path, root: Path = ROOT) -> list[tuple[int, list[str]]]:
    """(line, modules it may load) for every project import inside a function or method of `path`."""
    module = path.relative_to(root).with_suffix("").parts
    out: list[tuple[int, list[str]]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                names = [n for n in _imported_modules(child, module) if n.split(".")[0] in ALLOWED]
                if names:
                    out.append((child.lineno, names))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return out


def _allowance(rel: str) -> tuple[frozenset[str] | str, str] | None:
    return next((v for k, v in LAZY_PROJECT_IMPORTS.items() if rel == k or (k.endswith("/") and rel.startswith(k))),
                None)


def unexplained_lazy_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for package in ALLOWED:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            modules = (_allowance(rel) or (frozenset(), ""))[0]
            for line, names in function_level_imports(path, root):
                if modules == ANY or any(n in modules for n in names):
                    continue
                bad.append(f"{rel}:{line} imports {names[0]} inside a function: move it to the module's top, or "
                           "add the file and module to LAZY_PROJECT_IMPORTS in tests/test_layers.py with the reason "
                           "(an import cycle, or torch/chromadb/Flower kept off a light path)")
    return bad


def test_every_import_goes_down_the_layers():
    assert violations() == []


def test_the_walk_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    (tmp_path / "shared" / "sub").mkdir(parents=True)
    (tmp_path / "shared" / "sub" / "m.py").write_text(
        "def f():\n    from simulations.experiment import run_experiment\n\nfrom ... import client\n")
    for p in ALLOWED:
        (tmp_path / p).mkdir(exist_ok=True)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    found = violations(tmp_path)
    assert any("m.py:2 imports simulations/" in v for v in found), found


def test_project_imports_sit_at_module_top():
    assert unexplained_lazy_imports() == []


def test_the_lazy_import_allowances_are_still_needed():
    """An allowance whose file or module no longer imports lazily is removed, so the list stays true."""
    stale = []
    for rel, (modules, why) in LAZY_PROJECT_IMPORTS.items():
        assert why.strip(), f"{rel}: say why"
        paths = sorted((ROOT / rel).rglob("*.py")) if rel.endswith("/") else [ROOT / rel]
        assert all(p.is_file() for p in paths) and paths, f"{rel} does not exist"
        if modules == ANY:
            continue
        found = {n for p in paths for _, names in function_level_imports(p) for n in names}
        stale += [f"{rel}: {m}" for m in sorted(modules - found)]
    assert stale == [], stale


def test_the_lazy_import_check_sees_a_new_one(tmp_path):
    for p in ALLOWED:
        (tmp_path / p).mkdir()
    (tmp_path / "coordinator" / "run.py").write_text(
        "from shared import fileio\n\n\nclass C:\n    def m(self):\n        from shared.engine import Engine\n"
        "        from shared.tasks import get_task\n        import json\n")
    (tmp_path / "simulations" / "reports").mkdir()
    (tmp_path / "simulations" / "reports" / "x.py").write_text("def f():\n    from . import plots\n")
    found = sorted(unexplained_lazy_imports(tmp_path))
    assert len(found) == 2, found  # shared.engine is allowed in coordinator/run.py; json is not the project's
    assert found[0].startswith("coordinator/run.py:7 imports shared.tasks inside a function"), found
    assert found[1].startswith("simulations/reports/x.py:2 imports simulations.reports inside a function"), found


# A module past this many lines has usually grown a second concern (DESIGN.md: small modules;
# no file mixing I/O and maths past ~400 lines). A longer one is split, or named here with why.
MAX_MODULE_LINES = 500
LONG_MODULES: dict[str, str] = {}


def long_modules(root: Path = ROOT) -> list[str]:
    out = []
    for package in ALLOWED:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            n = len(path.read_text().splitlines())
            if n > MAX_MODULE_LINES and rel not in LONG_MODULES:
                out.append(f"{rel}: {n} lines (> {MAX_MODULE_LINES}): split it by concern, or name it in "
                           "LONG_MODULES in tests/test_layers.py with the reason")
    return out


def test_modules_stay_small():
    assert long_modules() == []
    stale = [rel for rel in LONG_MODULES if len((ROOT / rel).read_text().splitlines()) <= MAX_MODULE_LINES]
    assert stale == [], f"no longer long, remove from LONG_MODULES: {stale}"
