"""Plain-text tables for the command line."""

from __future__ import annotations

__all__ = ["table"]


def table(rows: list[list[str]], header: list[str]) -> str:
    """Right-aligned columns with a rule under the header."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
