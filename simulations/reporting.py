"""Tables people can read."""

from __future__ import annotations

from typing import Sequence

from shared.fileio import atomic_write

__all__ = ["atomic_write", "markdown_table"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def signed_percent(x: float) -> str:
    """A relative change as "+1.2%" / "-3.4%"; one that rounds to nothing reads "0.0%", not "-0.0%"."""
    text = f"{x:+.1%}"
    return "0.0%" if text in ("+0.0%", "-0.0%") else text
