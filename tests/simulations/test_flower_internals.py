"""Flower's private simulation API is used in one module, and an unsupported Flower says so."""

import pytest

from simulations import flower_internals


def test_the_installed_flower_is_the_supported_one():
    assert flower_internals.check_version().startswith(flower_internals.SUPPORTED)


def test_an_unsupported_flower_fails_loudly_before_a_run(monkeypatch):
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    with pytest.raises(RuntimeError, match=r"flwr 1\.99\.0 is installed.*flwr\[simulation\]==1\.42\.\*"):
        flower_internals.new_run()


def test_no_other_module_reaches_into_flowers_private_api():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    private = ("_run_simulation", "Run.create_empty", "TaskIdentity", "install_from_fab =", "run_clientapp as")
    users = sorted(str(p.relative_to(root)) for pkg in ("oppu", "shared", "client", "coordinator", "simulations")
                   for p in (root / pkg).rglob("*.py") if any(x in p.read_text() for x in private))
    assert users == ["client/flower_internals.py", "simulations/flower_internals.py"]


def test_the_app_gate_fails_closed_on_an_unsupported_flower(monkeypatch):
    import flwr

    from client import flower_internals as client_internals

    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    wrapped = []
    with pytest.raises(RuntimeError, match=r"flwr 1\.99\.0 is installed.*client/flower_internals\.py"):
        client_internals.clientapp_with_install_hook(lambda install: wrapped.append(install) or install)
    assert wrapped == []  # nothing of Flower's was replaced
