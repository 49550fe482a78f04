"""Whole numbers written as text in a request (a path's version, a length header).

`int()` raises ValueError past 4300 digits, which would reach the caller as a 500; a value
past int64 is no size or version graft could have anyway, so such text is simply no number.
"""

_MAX_DIGITS = 18  # every 18-digit decimal fits in int64


def decimal(text: str) -> int | None:
    """`text` as a non-negative integer, or None when it is not ASCII digits that fit int64."""
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_DIGITS:
        return None
    return int(text)
