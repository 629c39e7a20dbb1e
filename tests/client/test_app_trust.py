"""Secure by default: a daemon joins its coordinator over TLS unless the user opts out, and runs
only app bundles (FABs) it trusts (client/supernode.py, client/appgate.py).

Fast: the SuperNode command line, the settings, the gate's decision and the gate in front of
Flower's install step. Slow: real flower-superlink and flower-supernode processes on loopback
over TLS: bundles that are unpinned or signed by another key are refused and none of their code
runs; a pinned one and one signed by a trusted key run."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.appgate import (GATE_COMMAND, OTHER_TASK_COMMANDS, AppTrust, UntrustedAppBundle, app_trust, guarded,
                            install_gate, refusals, trust_status)
from client.settings import load_daemon
from client.supernode import supernode_command, supernode_supervisor

REPO = Path(__file__).resolve().parents[2]
COORD = "127.0.0.1:9092"
FAB = b"PK\x03\x04 stand-in bundle bytes"
FAB_HASH = hashlib.sha256(FAB).hexdigest()


# ------------------------------------------------------------------------------------ transport


def test_a_coordinator_needs_tls_or_an_explicit_insecure(tmp_path):
    with pytest.raises(ValueError) as e:
        supernode_command("flower-supernode", COORD, tmp_path, port=1)
    assert "coordinator_root_certificates" in str(e.value) and "insecure = true" in str(e.value)
    assert "--insecure" in str(e.value)  # the CLI flag, named in the message

    plain = supernode_command("flower-supernode", COORD, tmp_path, port=1, insecure=True)
    assert "--insecure" in plain and "--root-certificates" not in plain
    ca = tmp_path / "ca.crt"
    ca.write_text("pem")
    tls = supernode_command("flower-supernode", COORD, tmp_path, port=1, root_certificates=str(ca))
    assert "--insecure" not in tls and tls[tls.index("--root-certificates") + 1] == str(ca.resolve())
    with pytest.raises(ValueError, match="choose one"):
        supernode_command("flower-supernode", COORD, tmp_path, port=1, root_certificates=str(ca), insecure=True)
    with pytest.raises(ValueError, match="HOST:PORT"):
        supernode_supervisor("nowhere", tmp_path, insecure=True)


def test_settings_and_cli_carry_the_opt_in_and_the_pins():
    from oppu.cli import build_parser

    assert load_daemon(None, []).insecure is False
    spec = load_daemon(None, ["insecure=true", f'trusted_app_hashes=["{FAB_HASH}"]', 'trusted_entities="k.yaml"'])
    assert spec.insecure and spec.trusted_app_hashes == (FAB_HASH,) and spec.trusted_entities == "k.yaml"
    for bad in ("abc", FAB_HASH.upper(), FAB_HASH + "0"):
        with pytest.raises(ValueError, match="trusted_app_hashes.*sha256"):
            load_daemon(None, [f'trusted_app_hashes=["{bad}"]'])
    args = build_parser().parse_args(["client", "daemon", "--coordinator", COORD, "--insecure"])
    assert args.insecure is True
    assert build_parser().parse_args(["client", "daemon"]).insecure is False


def test_daemon_with_a_coordinator_and_no_transport_does_not_start(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "oppu", "client", "daemon", "--data-dir", str(tmp_path / "d"),
                        "--coordinator", COORD, "--port", "0", "--task", "synthetic-tag"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode != 0
    assert "needs TLS" in r.stderr and "coordinator_root_certificates" in r.stderr and "--insecure" in r.stderr, \
        r.stderr[-2000:]
    assert not (tmp_path / "d" / "daemon.json").exists()


# ------------------------------------------------------------------------------------ app bundles


def test_trust_decision():
    nothing = AppTrust(COORD, "/u")
    assert nothing.refusal(FAB) == (f"refused app bundle {FAB_HASH} from {COORD}: not in trusted_app_hashes; "
                                    "add it to trusted_app_hashes in /u/daemon.toml to allow")
    assert AppTrust(COORD, "/u", trusted_app_hashes=(FAB_HASH,)).refusal(FAB) is None
    assert AppTrust(COORD, "/u", trusted_app_hashes=("0" * 64,)).refusal(FAB) is not None
    # Keys only: Flower's SuperNode has verified the signature before the gate sees the bundle.
    assert AppTrust(COORD, "/u", trusted_entities="/k.yaml").refusal(FAB) is None
    # Both: both checks (the signature by Flower, the hash here).
    assert AppTrust(COORD, "/u", trusted_app_hashes=("0" * 64,), trusted_entities="/k.yaml").refusal(FAB) is not None


def test_gate_refuses_before_anything_is_installed_and_records_it(tmp_path):
    installed = []

    def install(fab: bytes, **kw: object) -> Path:
        installed.append(fab)
        return tmp_path / "installed"

    trust = app_trust(COORD, tmp_path, trusted_app_hashes=("1" * 64,))
    gate = install_gate(trust)
    policy = str(gate / "policy.json")
    with pytest.raises(UntrustedAppBundle) as refused:
        guarded(install, policy)(FAB, skip_prompt=True)
    # What goes back to the coordinator names the bundle, not the user's paths.
    assert str(refused.value) == f"refused app bundle {FAB_HASH}: this node does not trust it"
    assert installed == []
    [record] = refusals(tmp_path)
    assert record["fab_hash"] == FAB_HASH and record["coordinator"] == COORD
    assert "trusted_app_hashes" in record["message"]
    status = trust_status(trust, tmp_path / "logs" / "supernode.log")
    assert status["refused"] == [record] and status["messages"] == [record["message"]]

    install_gate(app_trust(COORD, tmp_path, trusted_app_hashes=(FAB_HASH,)))
    assert guarded(install, policy)(FAB, skip_prompt=True) == tmp_path / "installed"
    assert installed == [FAB]
    (gate / "policy.json").write_text("{")  # an unreadable policy refuses (fails closed)
    with pytest.raises(UntrustedAppBundle, match="trust policy is unreadable"):
        guarded(install, policy)(FAB)
    assert installed == [FAB]


def test_supernode_runs_clientapps_through_the_gate(tmp_path):
    entities = tmp_path / "keys.yaml"
    entities.write_text("{}")
    ca = tmp_path / "ca.crt"
    ca.write_text("pem")
    trust = app_trust(COORD, tmp_path / "d", trusted_app_hashes=(FAB_HASH,), trusted_entities=str(entities))
    (tmp_path / "d").mkdir()
    sup = supernode_supervisor(COORD, tmp_path / "d", root_certificates=str(ca), trust=trust)
    cmd = sup._make_command()
    assert cmd[cmd.index("--isolation") + 1] == "subprocess"  # the ClientApp is a process of its own ...
    assert cmd[cmd.index("--trusted-entities") + 1] == str(entities.resolve())
    # ... started by name from PATH: the gate comes first.
    gate = shutil.which(GATE_COMMAND, path=sup._env["PATH"])
    assert gate == str(tmp_path / "d" / "appgate" / GATE_COMMAND) and os.access(gate, os.X_OK)
    assert json.loads((tmp_path / "d" / "appgate" / "policy.json").read_text())["trusted_app_hashes"] == [FAB_HASH]
    # Tasks of other kinds (an AgentApp run, connectors, models) resolve to a refusal, which runs
    # nothing of the bundle and is recorded.
    for command in OTHER_TASK_COMMANDS:
        refuser = shutil.which(command, path=sup._env["PATH"])
        assert refuser == str(tmp_path / "d" / "appgate" / command)
        r = subprocess.run([refuser, "--runtime-api-address", "127.0.0.1:1", "--token", "t"], env=sup._env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and f"Flower started {command}" in r.stderr, r.stderr
    recorded = refusals(tmp_path / "d")
    assert [r["fab_hash"] for r in recorded] == [None] * len(OTHER_TASK_COMMANDS)
    assert all(r["message"].startswith(f"refused a task from {COORD} that is not a ClientApp") for r in recorded)


# ------------------------------------------------------------------------------------ real Flower processes

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
dependencies = ["flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "oppu"

[tool.flwr.app.components]
serverapp = "{name}.server:app"
clientapp = "{name}.client:app"
"""

SERVER = """import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.time() + 90
    nodes = []
    while len(nodes) < {nodes} and time.time() < deadline:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.5)
    msgs = [Message(RecordDict({{"q": ConfigRecord({{"x": 1}})}}), dst_node_id=n, message_type="query") for n in nodes]
    out = []
    for r in grid.send_and_receive(msgs, timeout=120):
        out.append({{"node": r.metadata.src_node_id,
                    "error": r.error.reason if r.has_error() else None}})
    Path({result!r}).write_text(json.dumps(out))
"""

CLIENT = """from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

Path({imported!r}).write_text("this bundle's code ran")  # at import: any code of it at all

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    (Path(context.node_config["data-dir"]) / "ran-{name}").write_text("ran")
    return Message(RecordDict({{"r": ConfigRecord({{"ran": 1}})}}), reply_to=msg)
"""


def _probe_app(root: Path, name: str, nodes: int) -> Path:
    d = root / name
    (d / name).mkdir(parents=True)
    (d / "pyproject.toml").write_text(PYPROJECT.format(name=name))
    (d / name / "__init__.py").write_text("")
    (d / name / "server.py").write_text(SERVER.format(nodes=nodes, result=str(root / f"result-{name}.json")))
    (d / name / "client.py").write_text(CLIENT.format(name=name, imported=str(root / f"imported-{name}")))
    return d


def _sign(fab: bytes, key: object, key_id: str) -> dict:
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    signed_at = int(time.time())
    sig = key.sign(create_message_to_sign(hashlib.sha256(fab).digest(), signed_at))
    return {"public_key_id": key_id, "signature": base64.urlsafe_b64encode(sig).decode().rstrip("="),
            "signed_at": signed_at}


def _openssl(*cmd: str, cwd: Path) -> None:
    subprocess.run(["openssl", *cmd], cwd=cwd, check=True, capture_output=True, timeout=120)


def _tls_credentials(d: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-sha256", "-days", "2", "-nodes", "-keyout", "ca.key",
             "-out", "ca.crt", "-subj", "/CN=oppu test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-sha256", "-extfile", "san.ext", "-out", "server.pem", cwd=d)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl for the SuperLink's TLS certificate")
def test_only_trusted_bundles_run_on_real_flower_processes(tmp_path, monkeypatch):
    """Two daemons' SuperNodes (client.supernode, as the daemon starts them) on a TLS SuperLink:
    node P pins one bundle's hash, node K trusts one publisher key. Four runs: an unpinned
    unsigned bundle, the pinned one, one signed by another key, one signed by the trusted key."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from flwr.cli.build import build_fab_from_disk

    from flower_deployment import BIN, free_port, stop, wait_for_port

    _tls_credentials(tmp_path)
    names = ("evillocal", "goodlocal", "evilsigned", "goodsigned")
    apps = {name: _probe_app(tmp_path, name, nodes=2) for name in names}
    fabs = {name: build_fab_from_disk(d) for name, d in apps.items()}  # what `flwr run DIR` uploads
    trusted_key, other_key = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    catalog = {}
    for name, key, key_id in (("evilsigned", other_key, "publisher"), ("goodsigned", trusted_key, "publisher")):
        (tmp_path / f"{name}.fab").write_bytes(fabs[name])
        catalog[f"@oppu/{name}==1.0.0"] = {"fab": str(tmp_path / f"{name}.fab"),
                                            "verifications": [_sign(fabs[name], key, key_id)]}
    (tmp_path / "catalog.json").write_text(json.dumps(catalog))
    entities = tmp_path / "trusted-entities.yaml"
    entities.write_text(json.dumps({"publisher": trusted_key.public_key().public_bytes(
        Encoding.OpenSSH, PublicFormat.OpenSSH).decode()}))

    port = free_port()
    coordinator = f"127.0.0.1:{port}"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for home in ("link-home", "cli-home", "node-home"):
        (tmp_path / home).mkdir()
    (tmp_path / "cli-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "fed"\n\n[superlink.fed]\naddress = "{coordinator}"\n'
        f'root-certificates = "{tmp_path / "ca.crt"}"\n')
    link_log = tmp_path / "superlink.log"
    link = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "hub_superlink.py"), str(tmp_path / "catalog.json"),
         "--ssl-ca-certfile", str(tmp_path / "ca.crt"), "--ssl-certfile", str(tmp_path / "server.pem"),
         "--ssl-keyfile", str(tmp_path / "server.key"), "--host", "127.0.0.1", "--port", str(port),
         "--disable-runtime-dependency-installation"],
        env={**env, "FLWR_HOME": str(tmp_path / "link-home")}, cwd=tmp_path, stdout=open(link_log, "wb"),
        stderr=subprocess.STDOUT, start_new_session=True)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "node-home"))  # the SuperNodes' (inherited) Flower home
    pinned, keyed = tmp_path / "user-pinned", tmp_path / "user-keyed"
    pinned.mkdir()
    keyed.mkdir()
    nodes = [
        supernode_supervisor(coordinator, pinned, root_certificates=str(tmp_path / "ca.crt"), initial=0.5,
                             trust=app_trust(coordinator, pinned,
                                             trusted_app_hashes=(hashlib.sha256(fabs["goodlocal"]).hexdigest(),))),
        supernode_supervisor(coordinator, keyed, root_certificates=str(tmp_path / "ca.crt"), initial=0.5,
                             trust=app_trust(coordinator, keyed, trusted_entities=str(entities))),
    ]
    try:
        wait_for_port(port, link, link_log)
        for node in nodes:
            node.start()

        def flwr_run(app: str) -> list[dict]:
            r = subprocess.run([str(BIN / "flwr"), "run", app, "fed", "--stream"], cwd=tmp_path,
                               env={**env, "FLWR_HOME": str(tmp_path / "cli-home")}, capture_output=True, text=True,
                               timeout=300)
            name = app.split("/")[-1].split("==")[0]
            result = tmp_path / f"result-{name}.json"
            logs = "".join(p.read_text(errors="replace")[-3000:]
                           for p in (link_log, pinned / "logs" / "supernode.log", keyed / "logs" / "supernode.log"))
            assert r.returncode == 0 and result.exists(), r.stdout[-2000:] + r.stderr[-2000:] + logs
            replies = json.loads(result.read_text())
            assert len(replies) == 2, replies
            return replies

        ran = {}
        for name, app in (("evillocal", str(apps["evillocal"])), ("goodlocal", str(apps["goodlocal"])),
                          ("evilsigned", "@oppu/evilsigned==1.0.0"), ("goodsigned", "@oppu/goodsigned==1.0.0")):
            replies = flwr_run(app)
            ran[name] = ([p.name for p in (pinned, keyed) if (p / f"ran-{name}").exists()],
                         sorted(r["error"] is None for r in replies))

        # None of the refused bundles' code ran anywhere, not even their imports.
        assert not (tmp_path / "imported-evillocal").exists() and not (tmp_path / "imported-evilsigned").exists()
        assert ran["evillocal"] == ([], [False, False]) and ran["evilsigned"] == ([], [False, False])
        # The coordinator learns which bundle was refused, nothing of the user's paths.
        assert str(pinned) not in (tmp_path / "result-evillocal.json").read_text()
        # The pinned bundle ran on the node that pinned it (the other one wants a signature) ...
        assert ran["goodlocal"] == (["user-pinned"], [False, True])
        # ... and the one signed by the trusted key on the node that trusts that key.
        assert ran["goodsigned"] == (["user-keyed"], [False, True])

        # What the users see in status: every refusal of the gate, with the hash and what to do ...
        gate = trust_status(app_trust(coordinator, pinned), pinned / "logs" / "supernode.log")
        refused = {r["fab_hash"] for r in gate["refused"]}
        assert refused == {hashlib.sha256(fabs[n]).hexdigest() for n in ("evillocal", "evilsigned", "goodsigned")}
        for r in gate["refused"]:
            assert r["message"] == (f"refused app bundle {r['fab_hash']} from {coordinator}: not in "
                                    "trusted_app_hashes; add it to trusted_app_hashes in "
                                    f"{pinned.resolve()}/daemon.toml to allow")
        # ... and Flower's signature refusals (an unsigned upload twice, another publisher's key once).
        keyed_status = trust_status(app_trust(coordinator, keyed, trusted_entities=str(entities)),
                                    keyed / "logs" / "supernode.log")
        assert keyed_status["refused_unsigned"] == 3 and keyed_status["refused"] == [], keyed_status
        assert f"not signed by a key in trusted_entities ({entities.resolve()})" in keyed_status["messages"][-1]
        assert all(n.status()["starts"] == 1 for n in nodes)  # over TLS, connected all along
    finally:
        for node in nodes:
            node.stop()
        stop(link)


def test_cli_status_shows_the_transport_and_the_refusals(monkeypatch, capsys):
    import argparse

    from client import commands

    message = AppTrust(COORD, "/u").refusal(FAB)
    status = {
        "daemon": {"task": "synthetic-tag", "method": "OPPU+RAG", "data_dir": "/u"},
        "base_model": {"hash": "ab" * 32, "quantization": "none", "device": "cpu", "threads": 1},
        "base_adapter": {"version": "untrained"}, "personal_adapter": None,
        "history": {"count": 0, "new_since_training": 0}, "privacy": {"rounds": 0, "epsilon": None},
        "federation": {"coordinator": COORD, "transport": "insecure", "state": "running", "last_error": None,
                       "app_trust": {"trusted_app_hashes": [], "trusted_entities": None, "messages": [message]}},
        "jobs": {"active": None}, "problems": [],
    }

    class FakeApi:
        def __init__(self, args: object) -> None:
            pass

        def call(self, method: str, path: str, **kw: object) -> dict:
            assert (method, path) == ("GET", "/v1/status")
            return status

    monkeypatch.setattr(commands, "Api", FakeApi)
    assert commands.cmd_status(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert f"federation      {COORD} over INSECURE (unencrypted, opted in): running" in out
    assert "app bundles     none trusted" in out and f"refused         {message}" in out
    status["federation"].update(transport="tls", app_trust={"trusted_app_hashes": [FAB_HASH],
                                                           "trusted_entities": "/k.yaml", "messages": []})
    commands.cmd_status(argparse.Namespace(json=False))
    out = capsys.readouterr().out
    assert f"{COORD} over TLS: running" in out and "1 pinned hash(es) and signed by a key in /k.yaml" in out
