"""Certificates for the tests that talk TLS to a real SuperLink, made with openssl in a test's
temporary directory (nothing is reused between tests or kept)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def sh(*cmd: str, cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=120)


def make_ca(d: Path, name: str = "ca") -> None:
    """d/<name>.crt and .key: a self-signed CA (every CA made here has the same subject name)."""
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-sha256", "-days", "2", "-nodes", "-keyout", f"{name}.key",
       "-out", f"{name}.crt", "-subj", "/CN=oppu test CA", cwd=d)


def make_server_cert(d: Path, ca: str = "ca") -> None:
    """d/server.pem and server.key: the SuperLink's certificate for 127.0.0.1, signed by d/<ca>."""
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
       "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    sh("openssl", "x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
       "-days", "2", "-sha256", "-extfile", "san.ext", "-out", "server.pem", cwd=d)
