"""The local API's edges: an IPv6 loopback Host is served; the CLI sends the token only to a process
that proves it holds it, never to whatever now listens on the port of a stale DIR/daemon.json."""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from client.api import create_app
from client.api_middleware import loopback_host
from client.daemon_client import Api, ApiError
from client.daemon import identity_proof
from client.service import ClientService
from client.settings import DaemonSpec

TOKEN = "t" * 43


@pytest.fixture(scope="module")
def app(tiny_engine, tmp_path_factory):
    svc = ClientService(DaemonSpec(task="synthetic-tag"), tmp_path_factory.mktemp("api") / "d", engine=tiny_engine)
    try:
        yield create_app(svc, TOKEN)
    finally:
        svc.close()


@pytest.mark.parametrize("host", ["[::1]:8731", "[::1]", "127.0.0.1:8731", "localhost", "LOCALHOST:80"])
def test_loopback_hosts_are_served_ipv6_included(app, host):
    client = TestClient(app, base_url="http://127.0.0.1")
    r = client.get("/v1/status", headers={"Authorization": "Bearer " + TOKEN, "Host": host})
    assert r.status_code == 200, (host, r.status_code, r.text)


@pytest.mark.parametrize("host", ["evil.example", "[::2]:8731", "[::1]x", "[::1]:", "[::1]:8x", "127.0.0.1.evil:80",
                                  "localhost:", "::1", "", "[::1", "127.0.0.2:80"])
def test_other_hosts_are_refused(app, host):
    assert not loopback_host(host)
    client = TestClient(app, base_url="http://127.0.0.1")
    r = client.get("/v1/status", headers={"Authorization": "Bearer " + TOKEN, "Host": host})
    assert r.status_code == 400 and "loopback" in r.json()["detail"]


def test_identity_proves_the_token_without_revealing_it(app):
    client = TestClient(app, base_url="http://127.0.0.1")
    nonce = secrets.token_hex(16)
    r = client.get("/identity", params={"nonce": nonce})  # no token needed
    assert r.status_code == 200
    body = r.json()
    assert body["proof"] == identity_proof(TOKEN, nonce, body["pid"]) and TOKEN not in r.text
    assert body["proof"] != identity_proof("x" * 43, nonce, body["pid"])
    assert client.get("/identity", params={"nonce": "not hex"}).status_code == 422
    assert "/identity" not in client.get("/openapi.json").json()["paths"]


class _Recorder(BaseHTTPRequestHandler):
    """Answers every request; remembers what it was sent."""

    seen: list[str] = []
    body = b'{"detail": "not found"}'
    status = 404

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.seen.append(f"{self.command} {self.path}\n{self.headers}\n" + self.rfile.read(length).decode(errors="replace"))
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("impostor", ["other-service", "forged-proof"])
def test_cli_never_sends_the_token_to_a_process_on_a_stale_port(tmp_path, impostor):
    """The daemon crashed; another local process took its port. daemon.json still names it."""
    token = secrets.token_urlsafe(32)
    (tmp_path / "token").write_text(token + "\n")
    forged = json.dumps({"pid": 4242, "proof": "0" * 64}).encode()
    handler = type("Impostor", (_Recorder,), {"seen": [], "status": 200 if impostor == "forged-proof" else 404,
                                              "body": forged if impostor == "forged-proof" else _Recorder.body})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    (tmp_path / "daemon.json").write_text(json.dumps({"pid": 4242, "url": f"http://127.0.0.1:{port}", "port": port}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ApiError, match="not the oppu daemon.*the token was not sent"):
            Api(argparse.Namespace(data_dir=str(tmp_path), url=None, token_file=None))
    finally:
        server.shutdown()
        server.server_close()
    assert handler.seen and all(r.startswith("GET /identity?nonce=") for r in handler.seen)
    assert not any(token in r or "authorization" in r.lower() for r in handler.seen)


def test_cli_says_the_daemon_json_is_stale_when_nothing_listens(tmp_path):
    (tmp_path / "token").write_text("t" * 43)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "daemon.json").write_text(json.dumps({"pid": 4242, "url": f"http://127.0.0.1:{port}", "port": port}))
    with pytest.raises(ApiError, match="cannot reach the daemon.*may be stale"):
        Api(argparse.Namespace(data_dir=str(tmp_path), url=None, token_file=None))


def test_cli_accepts_a_daemon_that_proves_the_token(tmp_path):
    """The positive side of the handshake, against a server that computes the proof (the real daemon's
    is tested end to end in test_daemon_process.py's CLI test)."""
    token = secrets.token_urlsafe(32)
    (tmp_path / "token").write_text(token)

    class Honest(_Recorder):
        seen: list[str] = []

        def do_GET(self) -> None:  # noqa: N802
            from urllib.parse import parse_qs, urlparse

            nonce = parse_qs(urlparse(self.path).query)["nonce"][0]
            type(self).body = json.dumps({"pid": 77, "proof": identity_proof(token, nonce, 77)}).encode()
            type(self).status = 200
            self._answer()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Honest)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        info = {"pid": 77, "url": f"http://127.0.0.1:{port}", "port": port}
        (tmp_path / "daemon.json").write_text(json.dumps(info))
        Api(argparse.Namespace(data_dir=str(tmp_path), url=None, token_file=None))  # no error
        (tmp_path / "daemon.json").write_text(json.dumps({**info, "pid": 78}))  # proven, but another PID
        with pytest.raises(ApiError, match="has pid 77, but DIR/daemon.json names pid 78"):
            Api(argparse.Namespace(data_dir=str(tmp_path), url=None, token_file=None))
    finally:
        server.shutdown()
        server.server_close()
