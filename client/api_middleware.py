"""The daemon API's ASGI middlewares, outermost first in client/api.py: a Host that is not a
loopback name gets 400 (a web page that rebinds a DNS name to 127.0.0.1 gets nothing), a request
under /v1/ without the bearer token gets 401 before a byte of its body is read, and a body over
its size limit gets 413.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import HTTPException

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class BodyLimit:
    """Pure ASGI middleware: refuse bodies over the limit (by Content-Length, and while streaming)."""

    def __init__(self, app: Any, *, default: int, per_path: dict[str, int]) -> None:
        self.app, self.default, self.per_path = app, default, per_path

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.per_path.get(scope.get("path", ""), self.default)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = True
            if too_big:
                return await _too_large(send, limit)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await _too_large(send, limit)


class TokenGate:
    """Pure ASGI middleware: a request under `prefix` without the bearer token is answered 401
    before its body is read, so nothing of it is parsed or validated (the route dependency
    `authorized` checks again and documents the scheme in the OpenAPI schema)."""

    def __init__(self, app: Any, *, token: bytes, prefix: str) -> None:
        self.app, self.token, self.prefix = app, token, prefix

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.prefix):
            return await self.app(scope, receive, send)
        if token_matches(dict(scope.get("headers") or []).get(b"authorization", b""), self.token):
            return await self.app(scope, receive, send)
        body = b'{"detail": "missing or wrong bearer token (see DIR/token)"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def loopback_host(header: str) -> bool:
    """A Host header naming a loopback host, with an optional port: 127.0.0.1, localhost, [::1]
    (an IPv6 literal carries its brackets; Starlette's TrustedHostMiddleware cut "[::1]:8731" at
    its first colon and refused it)."""
    host, port = header.strip().lower(), ""
    if host.startswith("["):
        end = host.find("]")
        host, rest = (host[:end + 1], host[end + 1:]) if end > 0 else ("", "")
        if rest:
            if not rest.startswith(":"):
                return False
            port = rest[1:] or "x"
    elif ":" in host:
        host, _, port = host.rpartition(":")
        port = port or "x"
    return host in LOOPBACK_HOSTS and (not port or (port.isdigit() and len(port) <= 5))


class LoopbackHost:
    """Pure ASGI middleware: a request whose Host is not a loopback name gets 400 (a web page that
    rebinds its DNS name to 127.0.0.1 reaches nothing)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if loopback_host(host):
            return await self.app(scope, receive, send)
        body = b'{"detail": "Host must be a loopback name: 127.0.0.1, localhost or [::1]"}'
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def token_matches(header: bytes, expected: bytes) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time (hmac.compare_digest)."""
    scheme, _, given = header.partition(b" ")
    if scheme.lower() != b"bearer":
        given = b""
    return hmac.compare_digest(given.strip(), expected)


class _BodyTooLarge(HTTPException):
    # An HTTPException, so FastAPI's body parsing re-raises it instead of answering 400.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")
        self.limit = limit


async def _too_large(send: Any, limit: int) -> None:
    body = f'{{"detail": "request body larger than {limit} bytes"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
