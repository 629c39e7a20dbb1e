"""The layers of DESIGN.md hold: every project import, function-level ones included, goes down.

oppu/ (the command) may import anything; simulations/ imports client/, coordinator/ and shared/;
client/ and coordinator/ import only shared/ and never each other; shared/ imports nothing above
itself. A lazy import is still a dependency, so the walk reads every import statement.
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
