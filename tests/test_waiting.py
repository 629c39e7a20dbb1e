"""tests/waiting.py: the one polling helper of the tests."""

import pytest

from waiting import wait_for


def test_returns_once_the_predicate_holds():
    calls = iter([False, False, True])
    wait_for(lambda: next(calls), 5, "the third call", every=0.001)


def test_a_timeout_names_what_was_awaited_reading_it_only_then():
    read = []

    def what() -> str:
        read.append(1)
        return "the log's tail"

    with pytest.raises(AssertionError, match=r"^timed out after 0\.05s waiting for the log's tail$"):
        wait_for(lambda: False, 0.05, what, every=0.01)
    assert read == [1]
