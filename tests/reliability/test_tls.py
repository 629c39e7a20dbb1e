"""A SuperLink with TLS and node authentication, certificates and keys made in the test (openssl,
ssh-keygen): a registered SuperNode that trusts the CA joins; an unregistered key and an insecure
connection do not. Slow: a SuperLink and three SuperNode processes, all stopped by PID."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from certs import make_ca, make_server_cert, sh
from flower_deployment import BIN, free_port, stop
from waiting import wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                                 reason="needs openssl and ssh-keygen")]


def make_credentials(d: Path) -> None:
    make_ca(d)
    make_server_cert(d)
    for name in ("node_ok", "node_unregistered"):
        sh("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", name, cwd=d)


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_superlink_with_tls_admits_only_registered_nodes(tmp_path, figures):
    make_credentials(tmp_path)
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fed"\n\n[superlink.fed]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{tmp_path / "ca.crt"}"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    link_log = tmp_path / "superlink.log"
    procs = [start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(tmp_path / "ca.crt"),
                    "--ssl-certfile", str(tmp_path / "server.pem"), "--ssl-keyfile", str(tmp_path / "server.key"),
                    "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
                    "--database", str(tmp_path / "link.db"), "--disable-runtime-dependency-installation"],
                   link_log, env)]
    try:
        def registered() -> bool:
            r = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(tmp_path / "node_ok.pub"), "fed"],
                               env=env, capture_output=True, text=True, timeout=60)
            return r.returncode == 0

        wait_for(registered, 60, lambda: "the node's key to register: " + link_log.read_text(errors="replace")[-2000:],
                 every=0.5)

        def node(name: str, *transport: str) -> tuple[subprocess.Popen, Path]:
            log = tmp_path / f"{name}.log"
            p = start([str(BIN / "flower-supernode"), *transport, "--superlink", f"127.0.0.1:{port}",
                       "--host", "127.0.0.1", "--port", str(free_port()), "--max-retries", "2", "--max-wait-time", "10"],
                      log, env)
            procs.append(p)
            return p, log

        ok, ok_log = node("ok", "--root-certificates", str(tmp_path / "ca.crt"),
                          "--auth-supernode-private-key", str(tmp_path / "node_ok"))
        bad, bad_log = node("unregistered", "--root-certificates", str(tmp_path / "ca.crt"),
                            "--auth-supernode-private-key", str(tmp_path / "node_unregistered"))
        plain, plain_log = node("insecure", "--insecure")

        def online() -> bool:
            r = subprocess.run([str(BIN / "flwr"), "supernode", "list", "fed"], env=env, capture_output=True,
                               text=True, timeout=60)
            return "online" in r.stdout

        wait_for(online, 90, lambda: "the node to be online: " + ok_log.read_text(errors="replace")[-2000:], every=0.5)
        time.sleep(10)
        listing = subprocess.run([str(BIN / "flwr"), "supernode", "list", "fed", "--verbose"], env=env,
                                 capture_output=True, text=True, timeout=60).stdout
        assert listing.count("online") == 1, listing
        assert ok.poll() is None  # still connected
        for p, log in ((bad, bad_log), (plain, plain_log)):
            wait_for(lambda p=p: p.poll() is not None, 90,
                     lambda log=log: "the node to be refused: " + log.read_text(errors="replace")[-2000:], every=0.5)
            assert p.returncode != 0
    finally:
        for p in reversed(procs):
            stop(p)
    figures.access("SuperLink with TLS + node authentication (real processes)",
                   "registered node with the CA: online; unregistered key: refused; --insecure: refused")
