"""What the daemon's service refuses a request with; client/api.py answers each with its HTTP
status (409 Conflict and Busy, 404 NotFound)."""

from __future__ import annotations


class Conflict(ValueError):
    """The request contradicts what is stored (e.g. an id re-used with different content)."""


class Busy(RuntimeError):
    """Another operation that needs exclusive use is under way."""


class NotFound(KeyError):
    """No such history item."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"
