"""Byte layouts of the Open Inference Protocol: BYTES elements and the binary tensor data
extension's REST bodies (a JSON header, then the tensors' bytes back to back).

A BYTES tensor's raw form is its elements in row-major order, each a 4-byte little-endian
length followed by that many bytes; gRPC's `raw_input_contents` / `raw_output_contents` use
the same layout. Everything here checks sizes before it copies anything.
"""

import struct
from collections.abc import Sequence

from service.errors import BadRequest
from service.protocol.decimal_text import decimal

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"
_LENGTH = struct.Struct("<I")


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements -> their raw form."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def deserialize_bytes(raw: bytes, count: int, where: str) -> list[bytes]:
    """Exactly `count` BYTES elements from `raw`, nothing missing and nothing left over."""
    elements = []
    offset = 0
    for index in range(count):
        if offset + _LENGTH.size > len(raw):
            raise BadRequest(
                f"{where} ends after {index} of the {count} elements its shape calls for; "
                "each BYTES element is a 4-byte little-endian length, then that many bytes"
            )
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + size > len(raw):
            raise BadRequest(
                f"{where}: element {index} declares {size} bytes but only "
                f"{len(raw) - offset} are left; check the 4-byte little-endian length prefixes"
            )
        elements.append(raw[offset : offset + size])
        offset += size
    if offset != len(raw):
        raise BadRequest(
            f"{where} has {len(raw) - offset} bytes left after the {count} elements its shape "
            "calls for; send one length-prefixed element per shape element"
        )
    return elements


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, "BinarySection"]:
    """A REST body -> its JSON part and what follows it (empty without the header)."""
    if header_length is None:
        return body, BinarySection(b"")
    size = decimal(header_length.strip())
    if size is None or size > len(body):
        raise BadRequest(
            f"{HEADER_LENGTH} must be the byte length of the JSON at the start of the body, "
            f"between 0 and the body's {len(body)} bytes; got {header_length[:40]!r}"
        )
    return body[:size], BinarySection(body[size:])


class BinarySection:
    """The binary part of a REST request, handed out to the inputs in order."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def take(self, size: int, where: str) -> bytes:
        left = len(self._data) - self._offset
        if size > left:
            raise BadRequest(
                f"{where}: parameters.binary_data_size is {size} but only {left} bytes of binary "
                f"data are left after the JSON header ({HEADER_LENGTH} and the inputs before it "
                "account for the rest)"
            )
        chunk = self._data[self._offset : self._offset + size]
        self._offset += size
        return chunk

    def finish(self) -> None:
        left = len(self._data) - self._offset
        if left:
            raise BadRequest(
                f"{left} bytes of binary data follow the last input: the inputs' "
                f"parameters.binary_data_size must add up to the body's length after the "
                f"{HEADER_LENGTH} bytes of JSON"
            )
