"""The one place the client reaches into Flower's private API, behind a version check.

The app gate (client/appgate.py) must see an app bundle's bytes before Flower's ClientApp
process unpacks or imports any of them, and Flower offers no public hook for that: the gate
wraps `flwr.supernode.runtime.run_clientapp.install_from_fab`, and reads the run id a refusal
is recorded under from `TaskIdentity`. Both change between minor releases, hence the
`flwr==1.42.*` pin in pyproject.toml and the check below: on another Flower the gate refuses
every bundle (fails closed) with a message naming both versions, never runs one unchecked.
(simulations/flower_internals.py is the simulation side's counterpart.)
"""

from __future__ import annotations

from typing import Any, Callable

SUPPORTED = "1.42."  # the minor release these calls were written against (pyproject pins it too)


def check_version(purpose: str = "the client's app gate", module: str = "client/flower_internals.py") -> str:
    """The installed Flower version; RuntimeError naming it, `purpose` and the `module` to port
    when these calls were not written for it (both sides' private calls use this one check)."""
    import flwr

    version = getattr(flwr, "__version__", "unknown")
    if not version.startswith(SUPPORTED):
        raise RuntimeError(
            f"{purpose} uses Flower's private API as of flwr {SUPPORTED}x, but flwr {version} is installed; "
            f"install the pinned version (pip install 'flwr[simulation]=={SUPPORTED}*') or port "
            f"{module} to the installed one")
    return version


def current_run_id() -> int | None:
    """The run id of the task this ClientApp process pulled (None before one is pulled)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity

        return TaskIdentity.run_id
    except (ImportError, RuntimeError, AttributeError):
        return None


def clientapp_with_install_hook(wrap: Callable[[Any], Any]) -> Callable[[], None]:
    """Flower's `flwr-clientapp` entry point with `install_from_fab` replaced by
    `wrap(install_from_fab)`: the ClientApp process hands every bundle's bytes to it before it
    unpacks or imports anything of the bundle."""
    check_version()
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    runtime.install_from_fab = wrap(runtime.install_from_fab)
    return flwr_clientapp
