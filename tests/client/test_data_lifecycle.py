"""A user's data directory over its life: the API token is created whole or not at all; `forget`
removes everything derived from the history."""

from __future__ import annotations

import multiprocessing
import stat

import pytest

from client import daemon


def test_token_is_never_visible_empty_or_partial_to_a_racing_start(tmp_path, monkeypatch):
    """Between creating the token file and writing it, a second start (or the CLI) reading the
    token found an empty file and failed; now the file appears complete, mode 0600, or not at all."""
    seen: list = []
    real = daemon.secrets.token_urlsafe

    def token_while_another_start_reads(n):
        token = real(n)
        if not seen:  # the other starter runs at the moment this one is making its token
            seen.append("racing")
            try:
                seen.append(daemon.ensure_token(tmp_path))
            except RuntimeError as e:
                seen.append(e)
        return token

    monkeypatch.setattr(daemon.secrets, "token_urlsafe", token_while_another_start_reads)
    mine = daemon.ensure_token(tmp_path)
    assert seen[1] == mine, f"the racing start got {seen[1]!r}"  # both agree on one complete token
    path = tmp_path / "token"
    assert path.read_text() == mine + "\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["token"]


def _make_token(d):
    import os

    os.fsync = lambda fd: os._exit(3)  # power cut / SIGKILL after the data was written, before it was durable
    daemon.ensure_token(d)


def test_a_start_killed_while_creating_the_token_leaves_no_token(tmp_path):
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_make_token, args=(tmp_path,))
    p.start()
    p.join(30)
    assert p.exitcode == 3
    assert not (tmp_path / "token").exists()  # the next start creates a new one
    assert len(daemon.ensure_token(tmp_path)) >= 32
