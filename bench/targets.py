"""How the load generator talks to each server: one request = one image, one response.

Every target raises RequestFailed(kind) for a failed request, where kind is short and stable
("http_503", "UNAVAILABLE", "ReadTimeout") so error counts group well in the report.
"""

import asyncio
import base64
import json
import uuid
from typing import Any, Protocol

import httpx

from bench.transport import make_transport

REQUEST_TIMEOUT_S = 60.0


class RequestFailed(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Target(Protocol):
    """Bodies are encoded once up front (`prepare`), so the load generator spends its CPU on
    sending, not on re-encoding the same multipart or base64 body for every request."""

    def prepare(self, image: bytes) -> Any: ...

    async def send(self, payload: Any) -> int | None:
        """Send one prepared image; return the model version that answered, if known."""
        ...

    async def close(self) -> None: ...


class _HttpTarget:
    def __init__(self, base_url: str, concurrency: int, client: str) -> None:
        self._transport = make_transport(client, base_url, concurrency)

    def _request(self, path: str, body: bytes, content_type: str) -> object:
        return self._transport.request_bytes(path, body, content_type)

    async def _post(self, prepared: object) -> bytes:
        try:
            status, body = await self._transport.post(prepared)
        except (OSError, asyncio.IncompleteReadError, httpx.HTTPError) as exc:
            raise RequestFailed(type(exc).__name__) from exc
        if status != 200:
            raise RequestFailed(f"http_{status}")
        return body

    async def close(self) -> None:
        await self._transport.close()


def multipart(fields: dict[str, str], file_field: str, image: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with text fields and one JPEG; returns (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
        f'filename="leaf.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class GraftHttp(_HttpTarget):
    """graft's own route: POST /classify, multipart field `images`."""

    def __init__(
        self, base_url: str, concurrency: int, client: str, model: str, top_k: int = 5
    ) -> None:
        super().__init__(base_url, concurrency, client)
        self._fields = {"model": model, "top_k": str(top_k)}

    def prepare(self, image: bytes) -> object:
        return self._request("/classify", *multipart(self._fields, "images", image))

    async def send(self, payload: object) -> int | None:
        return int(json.loads(await self._post(payload))["version"])


class TutorialHttp(_HttpTarget):
    """bench/peers/tutorial_app.py: POST /predict?top_k=K, multipart field `file`."""

    def __init__(self, base_url: str, concurrency: int, client: str, top_k: int = 5) -> None:
        super().__init__(base_url, concurrency, client)
        self._path = f"/predict?top_k={top_k}"

    def prepare(self, image: bytes) -> object:
        return self._request(self._path, *multipart({}, "file", image))

    async def send(self, payload: object) -> int | None:
        json.loads(await self._post(payload))  # parse the answer, as a real client would
        return None


class KServeV1(_HttpTarget):
    """KServe V1 (TF-Serving-style) protocol: JSON instances with base64 bytes."""

    def __init__(self, base_url: str, concurrency: int, client: str, model: str) -> None:
        super().__init__(base_url, concurrency, client)
        self._path = f"/v1/models/{model}:predict"

    def prepare(self, image: bytes) -> object:
        body = {"instances": [{"b64": base64.b64encode(image).decode("ascii")}]}
        return self._request(self._path, json.dumps(body).encode(), "application/json")

    async def send(self, payload: object) -> int | None:
        json.loads(await self._post(payload))
        return None


class GraftGrpc:
    """graft.v1.ImageClassifier/Classify over one grpc.aio channel (HTTP/2 multiplexes the
    concurrent calls, as a real gRPC client would)."""

    def __init__(self, address: str, model: str, top_k: int = 5) -> None:
        import grpc

        from service.stubs.graft.v1 import classifier_pb2, classifier_pb2_grpc

        self._grpc = grpc
        self._pb2 = classifier_pb2
        self._model = model
        self._top_k = top_k
        self._channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", 32 * 1024 * 1024),
                ("grpc.max_receive_message_length", 32 * 1024 * 1024),
            ],
        )
        self._stub = classifier_pb2_grpc.ImageClassifierStub(self._channel)

    def prepare(self, image: bytes) -> Any:
        return self._pb2.ClassifyRequest(model=self._model, images=[image], top_k=self._top_k)

    async def send(self, request: Any) -> int | None:
        try:
            response = await self._stub.Classify(request, timeout=REQUEST_TIMEOUT_S)
        except self._grpc.aio.AioRpcError as exc:
            raise RequestFailed(exc.code().name) from exc
        return int(response.version)

    async def close(self) -> None:
        await self._channel.close()


def make_target(spec: dict[str, Any], concurrency: int) -> Target:
    """spec: {"kind": "graft-http" | "graft-grpc" | "tutorial" | "kserve", "url" | "address",
    "model", "client": "raw" | "httpx" (HTTP only, default raw)}."""
    kind, client = spec["kind"], spec.get("client", "raw")
    if kind == "graft-http":
        return GraftHttp(spec["url"], concurrency, client, spec["model"])
    if kind == "graft-grpc":
        return GraftGrpc(spec["address"], spec["model"])
    if kind == "tutorial":
        return TutorialHttp(spec["url"], concurrency, client)
    if kind == "kserve":
        return KServeV1(spec["url"], concurrency, client, spec["model"])
    raise ValueError(f"unknown target kind {kind!r}")
