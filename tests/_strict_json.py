"""A strict JSON reader for the tests: ``NaN``, ``Infinity`` and ``-Infinity`` are refused.

Python's ``json.loads`` accepts those tokens, but most other JSON readers do not (issue 15).
Every test that reads what a ``--json`` command printed, or a JSON result file, reads it
with :func:`loads`, so that each command's output is checked to be strict JSON.
"""

import json


def _refuse(constant: str):
    raise ValueError(f"not strict JSON: the token {constant} (write null, and say why)")


def loads(text: str):
    return json.loads(text, parse_constant=_refuse)
