"""Which app bundles (FABs) a coordinator may run on this machine, and the gate that enforces it.

A SuperLink sends its SuperNodes an app bundle, and Flower's SuperNode installs it and imports its
ClientApp, which could then read everything in the user's data directory. The daemon therefore
runs only bundles it trusts, by two checks (each one configured must pass):

- `daemon.trusted_entities` (a YAML file of publisher keys, Flower's `--trusted-entities`): the
  SuperNode itself refuses a bundle that no listed key signed (Flower's FAB verification, done
  before the bundle is stored) and logs "FAB verification failed";
- `daemon.trusted_app_hashes` (sha256 of the .fab file): enforced here, where the ClientApp process
  starts. Flower's SuperNode cannot pin a hash, so the daemon runs it with `--isolation subprocess`
  and puts this gate first on its PATH as `flwr-clientapp` (the command Flower's SuperExec starts
  for every ClientApp task). The gate pulls the task, hashes the bundle's bytes itself and, only
  if the hash is pinned, hands over to Flower's own flwr-clientapp code, which installs and
  imports the bundle. An unpinned bundle is never unpacked or imported: the task ends with an
  error reply to the coordinator, and the refusal is recorded in DIR/appgate/refused.json, which
  GET /v1/status shows.

With neither setting, no bundle is trusted: every bundle is refused, and the refusal names the hash
to pin once the user has checked it with the coordinator's operator. Tasks of other kinds (a run
whose app is an AgentApp makes Flower start `flwr-agentapp`, and so on) are refused outright:
their commands resolve to `refuse_task`.

Files (DIR/appgate/, rewritten at every SuperNode start):

    flwr-clientapp   the gate (a /bin/sh script that runs `main` below with this daemon's Python)
    flwr-agentapp, flwr-connector, flwr-model, flwr-serverapp, flwr-simulation
                     the refusal of any other task (`refuse_task`)
    policy.json      {"coordinator", "data_dir", "trusted_app_hashes", "trusted_entities"}
    refused.json     the latest refusals, newest last: [{"time", "fab_hash" (null for a refused
                     task of another kind), "coordinator", "run_id", "message"}]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.fileio import atomic_write, locked_dir

from .flower_internals import clientapp_with_install_hook, current_run_id

GATE_DIR = "appgate"
GATE_COMMAND = "flwr-clientapp"  # what Flower's SuperExec starts for a ClientApp task (by name, from PATH)
# What it starts for the other task types (flwr 1.42, flwr.supercore.constant.TASK_TYPE_TO_COMMAND):
# a run whose app is an AgentApp makes the SuperNode start `flwr-agentapp`, which may in turn ask for
# connector and model tasks. The daemon runs none of them: these names resolve to a refusal.
OTHER_TASK_COMMANDS = ("flwr-agentapp", "flwr-connector", "flwr-model", "flwr-serverapp", "flwr-simulation")
POLICY_FILE = "policy.json"
REFUSED_FILE = "refused.json"
KEEP_REFUSALS = 20
HASH_RE = re.compile(r"[0-9a-f]{64}")
# What Flower's SuperNode logs when --trusted-entities rejects a bundle (flwr 1.42,
# flwr/supernode/start_client_internal.py): a bad or missing signature, or no signature at all.
FLOWER_REFUSALS = ("FAB verification failed", "The FAB could not be verified")
PROJECT_ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger(__name__)


class UntrustedAppBundle(RuntimeError):
    """The bundle's hash is not pinned: it is not installed and none of its code runs."""


@dataclass(frozen=True)
class AppTrust:
    """The trust policy of one data directory's SuperNode."""

    coordinator: str
    data_dir: str
    trusted_app_hashes: tuple[str, ...] = ()
    trusted_entities: str = ""  # resolved path of Flower's trusted-entities YAML, or ""

    def refusal(self, fab: bytes) -> str | None:
        """Why `fab` may not run here (None: it may). Hashes the bytes themselves: the hash a
        coordinator announces is not trusted."""
        digest = hashlib.sha256(fab).hexdigest()
        if digest in self.trusted_app_hashes:
            return None
        if not self.trusted_app_hashes and self.trusted_entities:
            return None  # Flower's SuperNode verified the publisher's signature before storing it
        return (f"refused app bundle {digest} from {self.coordinator}: not in trusted_app_hashes; add it to "
                f"trusted_app_hashes in {Path(self.data_dir) / 'daemon.toml'} to allow")


def app_trust(coordinator: str, data_dir: str | Path, *, trusted_app_hashes: tuple[str, ...] = (),
              trusted_entities: str = "") -> AppTrust:
    """The policy from the daemon's settings (paths resolved, hashes checked)."""
    check_hashes(tuple(trusted_app_hashes))
    entities = str(Path(trusted_entities).expanduser().resolve()) if trusted_entities else ""
    return AppTrust(coordinator=coordinator, data_dir=str(Path(data_dir).resolve()),
                    trusted_app_hashes=tuple(trusted_app_hashes), trusted_entities=entities)


def check_hashes(values: tuple[str, ...], setting: str = "daemon.trusted_app_hashes") -> None:
    for v in values:
        if not HASH_RE.fullmatch(v):
            raise ValueError(f"{setting}: {v!r} is not a sha256 hash (64 lowercase hex digits, as printed by "
                             "`sha256sum app.fab`)")


# ------------------------------------------------------------------------------ the daemon's side


def install_gate(trust: AppTrust) -> Path:
    """Write DIR/appgate/{policy.json, flwr-clientapp}; returns the directory to put first on PATH."""
    gate = Path(trust.data_dir) / GATE_DIR
    gate.mkdir(mode=0o700, parents=True, exist_ok=True)
    policy = gate / POLICY_FILE
    atomic_write(policy, json.dumps(asdict(trust), indent=2), mode=0o600)
    for command, call in ((GATE_COMMAND, "main()"), *((c, f"refuse_task({c!r})") for c in OTHER_TASK_COMMANDS)):
        entry = call.partition("(")[0]
        code = f"import sys; sys.path.insert(0, sys.argv[1]); from client.appgate import {entry}; {call}"
        script = ("#!/bin/sh\n"
                  "# Written by the oppu daemon at each SuperNode start (client/appgate.py): Flower starts\n"
                  f"# `{command}` from PATH for a task; this one decides whether the task's app bundle runs.\n"
                  f"exec {shlex.quote(sys.executable)} -c {shlex.quote(code)} {shlex.quote(str(PROJECT_ROOT))} "
                  f"{shlex.quote(str(policy))} \"$@\"\n")
        atomic_write(gate / command, script, mode=0o700)
    return gate


def gated_path(gate: Path, path: str) -> str:
    """PATH with the gate first, so `flwr-clientapp` resolves to it."""
    return os.pathsep.join([str(gate), *(p for p in path.split(os.pathsep) if p and p != str(gate))])


def refusals(data_dir: str | Path) -> list[dict[str, Any]]:
    """The recorded refusals of the gate, newest last ([] when none or unreadable)."""
    try:
        data = json.loads((Path(data_dir) / GATE_DIR / REFUSED_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def flower_refusals(log_path: str | Path, *, tail: int = 1 << 20) -> int:
    """How many bundles Flower's signature check refused, counted in the SuperNode log's tail."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - tail))
            text = fh.read().decode(errors="replace")
    except OSError:
        return 0
    return sum(text.count(marker) for marker in FLOWER_REFUSALS)


def trust_status(trust: AppTrust, log_path: Path) -> dict[str, Any]:
    """The `app_trust` part of GET /v1/status."""
    refused = refusals(trust.data_dir)
    unsigned = flower_refusals(log_path) if trust.trusted_entities else 0
    messages = [r.get("message", "") for r in refused[-3:]]
    if unsigned:
        messages.append(f"refused {unsigned} app bundle(s) from {trust.coordinator}: not signed by a key in "
                        f"trusted_entities ({trust.trusted_entities}); see {log_path}")
    return {"trusted_app_hashes": list(trust.trusted_app_hashes), "trusted_entities": trust.trusted_entities or None,
            "refused": refused, "refused_unsigned": unsigned, "messages": messages}


# ------------------------------------------------------------------------------ the gate process


def _record(trust: AppTrust, fab_hash: str | None, message: str) -> None:
    run_id = current_run_id()  # set by Flower when it pulled the task
    with locked_dir(Path(trust.data_dir) / GATE_DIR, mode=0o700) as gate:  # concurrent tasks take turns
        kept = refusals(trust.data_dir)[-(KEEP_REFUSALS - 1):]
        kept.append({"time": time.time(), "fab_hash": fab_hash, "coordinator": trust.coordinator,
                     "run_id": run_id, "message": message})
        atomic_write(gate / REFUSED_FILE, json.dumps(kept, indent=2), mode=0o600)


def _load_policy(path: str) -> AppTrust:
    data = json.loads(Path(path).read_text())
    trust = AppTrust(coordinator=str(data["coordinator"]), data_dir=str(data["data_dir"]),
                     trusted_app_hashes=tuple(data["trusted_app_hashes"]),
                     trusted_entities=str(data["trusted_entities"] or ""))
    check_hashes(trust.trusted_app_hashes, f"{path}: trusted_app_hashes")
    return trust


def _forget_daemon_modules() -> None:
    """Let the bundle import its own modules: drop the daemon's packages (imported for this check)
    from this process, so a bundle that has `client` or `shared` packages too gets its own."""
    root = str(PROJECT_ROOT)
    for name in list(sys.modules):
        top = name.partition(".")[0]
        f = getattr(sys.modules[name], "__file__", None) or ""
        if (PROJECT_ROOT / top / "__init__.py").is_file() and f.startswith(str(PROJECT_ROOT / top) + os.sep):
            del sys.modules[name]
    while root in sys.path:
        sys.path.remove(root)


def guarded(install: Any, policy_path: str, *, hand_over: Any = None) -> Any:
    """`install` (Flower's install_from_fab) behind the trust check: an untrusted bundle raises
    UntrustedAppBundle before a byte of it is unpacked; a trusted one is installed as before,
    after `hand_over()` (in the gate process: _forget_daemon_modules)."""

    def checked_install(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        fab = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        digest = hashlib.sha256(fab).hexdigest()
        try:
            trust = _load_policy(policy_path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("refused app bundle %s: the daemon's trust policy %s is unreadable (%s); restart the daemon",
                      digest, policy_path, e)
            raise UntrustedAppBundle(f"refused app bundle {digest}: this node's trust policy is unreadable") from None
        message = trust.refusal(fab)
        if message is not None:
            _record(trust, digest, message)
            # Flower replies to the coordinator with this text: the hash, not the user's paths.
            raise UntrustedAppBundle(f"refused app bundle {digest}: this node does not trust it")
        if hand_over is not None:
            hand_over()
        return install(fab_file, *args, **kwargs)

    return checked_install


def refuse_task(command: str) -> None:
    """Stands in for Flower's other task processes (OTHER_TASK_COMMANDS): records the refusal and
    exits non-zero without contacting the SuperNode, so none of the bundle is fetched or run."""
    policy_path = sys.argv[2]
    try:
        trust = _load_policy(policy_path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"oppu: refused {command}: the daemon's trust policy {policy_path} is unreadable ({e})")
    message = (f"refused a task from {trust.coordinator} that is not a ClientApp (Flower started {command}): "
               "this daemon runs only the ClientApps of trusted app bundles")
    _record(trust, None, message)
    sys.exit(f"oppu: {message}")


def main() -> None:
    """`flwr-clientapp` with the trust check: argv = [-c, PROJECT_ROOT, POLICY, *flwr-clientapp args]."""
    policy_path = sys.argv[2]
    sys.argv = [GATE_COMMAND, *sys.argv[3:]]
    # Flower's ClientApp process pulls its task, then hands the bundle's bytes to install_from_fab
    # before it unpacks or imports anything of it: the one place to check them. On a Flower
    # these hooks were not written for, nothing runs (fail closed).
    try:
        clientapp = clientapp_with_install_hook(
            lambda install: guarded(install, policy_path, hand_over=_forget_daemon_modules))
    except (RuntimeError, ImportError, AttributeError) as e:
        sys.exit(f"oppu: refused to run a ClientApp: {e}")
    clientapp()
