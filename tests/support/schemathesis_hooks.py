"""schemathesis hooks for tests/test_openapi_contract.py (SCHEMATHESIS_HOOKS names this module).

A model push's body is `application/gzip`, a media type schemathesis has no serializer for:
the bytes generated for it go on the wire as they are.
"""

from typing import Any

import schemathesis


@schemathesis.serializer("application/gzip")
def gzip_body(context: Any, value: Any) -> dict[str, Any]:
    if isinstance(value, bytes):
        return {"data": value}
    return {"data": str(value).encode()}
