"""Reading XLA's optimised HLO text in tests: its computations, by name."""

from __future__ import annotations

import re


def computations(hlo: str) -> dict[str, list[str]]:
    """``name -> lines`` of every computation (fused ones included) of a compiled module's text."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = bodies.setdefault(head.group(1), [])
        elif current is not None:
            current.append(line)
    return bodies
