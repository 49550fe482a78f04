"""JSON request bodies, parsed so that no literal can fail the parser itself.

Python refuses to turn an integer literal of more than 4300 digits into an int (a guard against
quadratic-time conversion) and `json.loads` raises ValueError on one, which would reach the
caller as a 500. Such a literal is parsed as infinity instead, as `json` already does for
`1e999`, so the field checks that follow refuse it by name with a 400 ("top_k: Input should be
a finite number").
"""

import json
import math
from typing import Any

_MAX_INT_DIGITS = 4000  # under Python's limit of 4300, so `int()` below never raises


def _int(literal: str) -> int | float:
    if len(literal) <= _MAX_INT_DIGITS:
        return int(literal)
    return -math.inf if literal.startswith("-") else math.inf


def loads(document: bytes | str) -> Any:
    """`json.loads` with over-long integer literals as infinity; raises what it raises."""
    return json.loads(document, parse_int=_int)
