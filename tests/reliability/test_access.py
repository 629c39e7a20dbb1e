"""Access: the local API listens on loopback only and needs its token (compared in constant
time); the token file is owner-only; nothing is unpickled from the network or an archive; a
client never keeps a model or adapter whose bytes differ from the coordinator's manifest; the
SuperNode command the daemon builds uses TLS unless the user opts out; a real SuperLink's TLS
handshake succeeds for a client trusting its CA and fails for one trusting another."""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from client.daemon import bind_socket, ensure_token

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # flower_deployment: starting and stopping Flower's processes


def test_api_binds_loopback_only(figures):
    refused = []
    for host in ("0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "8.8.8.8"):
        with pytest.raises(ValueError, match="loopback"):
            bind_socket(host, 0).close()
        refused.append(host)
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()
    from client.settings import load_daemon

    with pytest.raises(ValueError):
        load_daemon(None, ['host="0.0.0.0"'])
    figures.access("API bind address", f"127.0.0.1 accepted; {', '.join(refused)} refused (bind_socket and "
                   "daemon.host validation)")


def test_token_file_owner_only(tmp_path, figures):
    token = ensure_token(tmp_path)
    f = tmp_path / "token"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600 and len(token) >= 32
    os.chmod(f, 0o644)  # someone widened it
    assert ensure_token(tmp_path) == token and stat.S_IMODE(f.stat().st_mode) == 0o600
    f.unlink()
    (tmp_path / "elsewhere").write_text("x" * 40)
    f.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RuntimeError, match="not a regular file"):
        ensure_token(tmp_path)
    figures.access("token file", "created 0600 with O_EXCL|O_NOFOLLOW; a widened mode is reset to 0600; "
                   "a symlink in its place is refused")


def test_token_compared_in_constant_time(tiny_engine, tmp_path, monkeypatch, figures):
    import hmac

    from starlette.testclient import TestClient

    import client.api as api
    from client.service import ClientService
    from client.settings import DaemonSpec

    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    svc = ClientService(DaemonSpec(task="synthetic-tag"), tmp_path / "d", engine=tiny_engine)
    try:
        token = "k" * 43
        client = TestClient(api.create_app(svc, token), base_url="http://127.0.0.1")
        results = {}
        for name, header in {"none": None, "wrong": "Bearer " + "k" * 42 + "j", "prefix": "Bearer " + "k" * 10,
                             "basic": "Basic " + token, "right": "Bearer " + token}.items():
            r = client.get("/v1/status", headers={"Authorization": header} if header else {})
            results[name] = r.status_code
        assert results == {"none": 401, "wrong": 401, "prefix": 401, "basic": 401, "right": 200}, results
        assert len(calls) >= 5  # every check went through hmac.compare_digest
        assert client.get("/openapi.json").status_code == 200  # the schema is public and holds nothing personal
        assert client.get("/v1/status", headers={"Authorization": "Bearer " + token,
                                                 "Host": "attacker.example"}).status_code == 400
    finally:
        svc.close()
    figures.access("API token", "missing, wrong, truncated and non-bearer tokens get 401 before the body is read; "
                   "every comparison is hmac.compare_digest; a non-loopback Host gets 400 (DNS rebinding)")


UNSAFE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("torch", "load"), ("joblib", "load"), ("dill", "load"),
                ("dill", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("pickle", "Unpickler")}


def test_nothing_is_unpickled(figures):
    """No module loads pickle-based formats: weights are read with safetensors only."""
    offenders = []
    files = [p for d in ("client", "coordinator", "shared", "simulations") for p in (REPO / d).rglob("*.py")]
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
                if (name, node.func.attr) in UNSAFE_CALLS:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {name}.{node.func.attr}")
                if node.func.attr == "load" and name in ("np", "numpy"):
                    if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                           for k in node.keywords):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno} np.load(allow_pickle)")
                if any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is False
                       for k in node.keywords):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} weights_only=False")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                offenders += [f"{path.relative_to(REPO)}:{node.lineno} imports {m}" for m in mods
                              if m.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib")]
    assert not offenders, offenders
    figures.access("no unpickling", f"{len(files)} modules scanned (AST): no pickle/dill/joblib, torch.load, "
                   "np.load(allow_pickle) or weights_only=False; artifacts with pickle-format files and archives "
                   "with non-safetensors weights are refused (test_bad_input, test_daemon_inputs)")


def test_client_never_keeps_a_model_that_differs_from_the_manifest(tiny_model_dir, tmp_path, figures):
    from client.artifacts import ArtifactCache, ArtifactRejected
    from coordinator.distribution import Artifact, iter_chunks
    from shared.protocol import KIND_MODEL, ClientError

    model = Artifact.from_dir(tiny_model_dir, KIND_MODEL)
    cache = ArtifactCache(tmp_path / "cache")
    chunks = list(iter_chunks(model, 1 << 20))
    rejected = []
    for i, (header, data) in enumerate(chunks):
        if i == len(chunks) // 2:  # one byte of the weights altered on the way
            data = bytearray(data)
            data[len(data) // 2] ^= 1
            data = bytes(data)
        try:
            cache.receive(header, data)
        except ArtifactRejected as e:  # when the damaged file is complete, its sha256 is checked
            rejected.append(str(e))
    assert rejected and "sha256" in rejected[0], rejected
    assert not cache.has(model.id) and cache.held() == []
    with pytest.raises(ClientError, match="not in the client cache"):
        cache.path(model.id)  # so no Engine is ever built from it
    # Sent again intact (the transfer resumes where the verified bytes end), it is accepted.
    for header, data in chunks:
        try:
            cache.receive(header, data)
        except ArtifactRejected:
            pass
    assert cache.has(model.id)
    for rel, digest in model.manifest.files.items():
        assert hashlib.sha256((cache.path(model.id) / rel).read_bytes()).hexdigest() == digest
    figures.access("model and adapter hashes", f"{model.manifest.total_bytes / 2**20:.1f} MB model with one byte "
                   "flipped in transit: refused, nothing cached, no engine can load it; resent intact: accepted "
                   "and every file matches the manifest")


def test_supernode_uses_tls_and_node_auth_when_configured(tmp_path, figures):
    from client.supernode import supernode_command

    ca, key = tmp_path / "ca.crt", tmp_path / "node_key"
    ca.write_text("x")
    key.write_text("x")
    with pytest.raises(ValueError, match="needs TLS"):  # plain text only when the user opts in
        supernode_command("flower-supernode", "127.0.0.1:9092", tmp_path, port=1)
    insecure = supernode_command("flower-supernode", "127.0.0.1:9092", tmp_path, port=1, insecure=True)
    assert "--insecure" in insecure
    secure = supernode_command("flower-supernode", "coordinator.example:9092", tmp_path, port=1,
                               root_certificates=str(ca), auth_private_key=str(key))
    assert "--insecure" not in secure
    assert secure[secure.index("--root-certificates") + 1] == str(ca)
    assert secure[secure.index("--auth-supernode-private-key") + 1] == str(key)
    with pytest.raises(ValueError, match="TLS"):
        supernode_command("flower-supernode", "127.0.0.1:9092", tmp_path, port=1, auth_private_key=str(key))
    with pytest.raises(ValueError, match="no such file"):
        supernode_command("flower-supernode", "127.0.0.1:9092", tmp_path, port=1,
                          root_certificates=str(tmp_path / "missing.crt"))
    figures.access("SuperNode transport", "TLS unless the user opts in (insecure = true); neither: the daemon "
                   "does not start; --insecure only with insecure = true; with daemon.coordinator_root_certificates "
                   "TLS (--root-certificates) and, with daemon.supernode_auth_key, node authentication "
                   "(--auth-supernode-private-key); auth without TLS is refused (docs/federation.md)")


def _handshake(port: int, ca: Path) -> str:
    """A TLS handshake with whatever listens on 127.0.0.1:port, trusting only `ca` and checking
    the host name, as the daemon's SuperNode does. Returns the protocol version agreed; raises
    ssl.SSLError when the server's certificate is not vouched for by `ca`."""
    import socket
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return str(tls.version())


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl to make the certificates")
def test_supernode_transport_is_verified_by_a_real_tls_handshake(tmp_path, figures):
    """A real flower-superlink on loopback serving TLS with certificates made as for test_tls.py
    (certs.py): a client trusting the right CA completes the handshake; one trusting another CA
    (a coordinator impersonated, or the wrong CA configured) fails it with a certificate error,
    before a byte of the protocol is sent."""
    import ssl
    import subprocess

    from flower_deployment import BIN, free_port, stop, wait_for_port
    from certs import make_ca, make_server_cert

    make_ca(tmp_path, "ca")
    make_server_cert(tmp_path, "ca")
    other = tmp_path / "other"
    other.mkdir()
    make_ca(other, "ca")  # a CA of the same name that did not sign the SuperLink's certificate
    port = free_port()
    log = tmp_path / "superlink.log"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "wb") as out:
        link = subprocess.Popen([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(tmp_path / "ca.crt"),
                                 "--ssl-certfile", str(tmp_path / "server.pem"), "--ssl-keyfile",
                                 str(tmp_path / "server.key"), "--host", "127.0.0.1", "--port", str(port),
                                 "--database", str(tmp_path / "link.db"), "--disable-runtime-dependency-installation"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for_port(port, link, log, timeout=120)
        version = _handshake(port, tmp_path / "ca.crt")
        assert version.startswith("TLSv1."), version
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            _handshake(port, other / "ca.crt")
        assert link.poll() is None, log.read_text(errors="replace")[-2000:]
    finally:
        stop(link)
    figures.access("SuperNode transport (real TLS handshake)",
                   f"flower-superlink on loopback with TLS: a client trusting its CA completes the handshake "
                   f"({version}); a client trusting another CA fails it (certificate verify failed)")
