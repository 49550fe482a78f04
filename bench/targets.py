"""How the load generator talks to each server: one request = one image, one response.

Every target raises RequestFailed(kind) for a failed request, where kind is short and stable
("http_503", "UNAVAILABLE", "ReadTimeout") so error counts group well in the report.
"""

import base64
import json
import uuid
from typing import Any, Protocol

import httpx

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
    def __init__(self, base_url: str, concurrency: int) -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.AsyncClient(
            base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_S
        )

    async def _post(self, path: str, body: bytes, content_type: str) -> httpx.Response:
        headers = {"content-type": content_type}
        try:
            response = await self._client.post(path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise RequestFailed(type(exc).__name__) from exc
        if response.status_code != 200:
            raise RequestFailed(f"http_{response.status_code}")
        return response

    async def close(self) -> None:
        await self._client.aclose()


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

    def __init__(self, base_url: str, concurrency: int, model: str, top_k: int = 5) -> None:
        super().__init__(base_url, concurrency)
        self._fields = {"model": model, "top_k": str(top_k)}

    def prepare(self, image: bytes) -> tuple[bytes, str]:
        return multipart(self._fields, "images", image)

    async def send(self, payload: tuple[bytes, str]) -> int | None:
        response = await self._post("/classify", *payload)
        return int(response.json()["version"])


class TutorialHttp(_HttpTarget):
    """bench/peers/tutorial_app.py: POST /predict?top_k=K, multipart field `file`."""

    def __init__(self, base_url: str, concurrency: int, top_k: int = 5) -> None:
        super().__init__(base_url, concurrency)
        self._path = f"/predict?top_k={top_k}"

    def prepare(self, image: bytes) -> tuple[bytes, str]:
        return multipart({}, "file", image)

    async def send(self, payload: tuple[bytes, str]) -> int | None:
        response = await self._post(self._path, *payload)
        response.json()  # parse like a real client would
        return None


class KServeV1(_HttpTarget):
    """KServe V1 (TF-Serving-style) protocol: JSON instances with base64 bytes."""

    def __init__(self, base_url: str, concurrency: int, model: str) -> None:
        super().__init__(base_url, concurrency)
        self._path = f"/v1/models/{model}:predict"

    def prepare(self, image: bytes) -> tuple[bytes, str]:
        body = {"instances": [{"b64": base64.b64encode(image).decode("ascii")}]}
        return json.dumps(body).encode(), "application/json"

    async def send(self, payload: tuple[bytes, str]) -> int | None:
        response = await self._post(self._path, *payload)
        response.json()
        return None


class GraftGrpc:
    """graft.v1.ImageClassifier/Classify over one grpc.aio channel (HTTP/2 multiplexes the
    concurrent calls, as a real gRPC client would)."""

    def __init__(self, address: str, model: str, top_k: int = 5) -> None:
        import grpc

        from service.grpc_stubs.graft.v1 import classifier_pb2, classifier_pb2_grpc

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
    "model"}."""
    kind = spec["kind"]
    if kind == "graft-http":
        return GraftHttp(spec["url"], concurrency, spec["model"])
    if kind == "graft-grpc":
        return GraftGrpc(spec["address"], spec["model"])
    if kind == "tutorial":
        return TutorialHttp(spec["url"], concurrency)
    if kind == "kserve":
        return KServeV1(spec["url"], concurrency, spec["model"])
    raise ValueError(f"unknown target kind {kind!r}")
