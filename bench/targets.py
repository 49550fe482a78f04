"""How the load generator talks to each server: one request = one image, one response.

Every target raises RequestFailed(kind) for a failed request, where kind is short and stable
("http_503", "UNAVAILABLE", "ReadTimeout") so error counts group well in the report.
"""

import asyncio
import base64
import json
import struct
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from bench.transport import Answer, make_transport

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
    """What every HTTP target shares: the transport, requests encoded once, and the answer's
    status checked (anything but 200 is a failed request). Subclasses only build the body and
    read the answer."""

    def __init__(self, base_url: str, concurrency: int, client: str) -> None:
        self._transport = make_transport(client, base_url, concurrency)

    def _request(
        self, path: str, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> object:
        return self._transport.request_bytes(path, body, content_type, headers)

    async def _post(self, prepared: object) -> Answer:
        try:
            answer = await self._transport.post(prepared)
        except (OSError, asyncio.IncompleteReadError, httpx.HTTPError) as exc:
            raise RequestFailed(type(exc).__name__) from exc
        if answer.status != 200:
            raise RequestFailed(f"http_{answer.status}")
        return answer

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
        return int(json.loads((await self._post(payload)).body)["version"])


class TutorialHttp(_HttpTarget):
    """bench/peers/tutorial_app.py: POST /predict?top_k=K, multipart field `file`."""

    def __init__(self, base_url: str, concurrency: int, client: str, top_k: int = 5) -> None:
        super().__init__(base_url, concurrency, client)
        self._path = f"/predict?top_k={top_k}"

    def prepare(self, image: bytes) -> object:
        return self._request(self._path, *multipart({}, "file", image))

    async def send(self, payload: object) -> int | None:
        json.loads((await self._post(payload)).body)  # parse the answer, as a client would
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
        json.loads((await self._post(payload)).body)
        return None


# -- the Open Inference Protocol (V2) over REST, binary tensor data ---------------------------

V2_HEADER_LENGTH = "Inference-Header-Content-Length"
V2_MEDIA_TYPE = "application/octet-stream"
# What /classify answers with top_k=5 (top-1 label and score, the 5 most probable classes), so
# that a V2 request asks graft for the same work as a /classify one.
V2_OUTPUTS = ("label", "score", "top_k_label", "top_k_score")
_LENGTH = struct.Struct("<I")


def v2_bytes(elements: Sequence[bytes]) -> bytes:
    """A BYTES tensor's raw form: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def v2_binary_request(
    images: Sequence[bytes], outputs: Sequence[str], parameters: dict[str, Any]
) -> tuple[bytes, str, dict[str, str]]:
    """(body, content type, headers) of a V2 inference request as tritonclient.http sends it
    by default: `images` BYTES [N] as binary tensor data, each output asked for as binary
    data, the JSON header's length in Inference-Header-Content-Length. The JSON is laid out as
    tritonclient's (rapidjson's compact form, its key order), so the body is byte for byte what
    it sends."""
    raw = v2_bytes(images)
    document: dict[str, Any] = {
        "inputs": [
            {
                "name": "images",
                "shape": [len(images)],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
    }
    if parameters:
        document["parameters"] = parameters
    header = json.dumps(document, separators=(",", ":")).encode()
    return header + raw, V2_MEDIA_TYPE, {V2_HEADER_LENGTH: str(len(header))}


def v2_answer(answer: Answer) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """A V2 REST answer -> (its JSON header, each output's elements in row-major order), JSON
    `data` or binary tensor data (BYTES as str, FP32 as float), as a client reads it. Raises
    ValueError if the binary part does not add up."""
    body = answer.body
    size = int(answer.headers.get(V2_HEADER_LENGTH.lower(), len(body)))
    document = json.loads(body[:size])
    offset, outputs = size, {}
    for output in document["outputs"]:
        if "data" in output:
            outputs[output["name"]] = output["data"]
            continue
        length = output["parameters"]["binary_data_size"]
        raw, offset = body[offset : offset + length], offset + length
        outputs[output["name"]] = _v2_elements(raw, output["datatype"])
    if offset != len(body):
        raise ValueError(f"binary outputs take {offset - size} of {len(body) - size} bytes")
    return document, outputs


def _v2_elements(raw: bytes, datatype: str) -> list[Any]:
    if datatype == "FP32":
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    if datatype != "BYTES":
        raise ValueError(f"unexpected datatype {datatype}")
    elements, offset = [], 0
    while offset < len(raw):
        (length,) = _LENGTH.unpack_from(raw, offset)
        elements.append(raw[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    return elements


class GraftV2(_HttpTarget):
    """graft's Open Inference Protocol route: POST /v2/models/{name}/infer, one image as
    binary tensor data, the outputs /classify answers with (top_k 5), read back as binary."""

    def __init__(
        self, base_url: str, concurrency: int, client: str, model: str, top_k: int = 5
    ) -> None:
        super().__init__(base_url, concurrency, client)
        self._path = f"/v2/models/{quote(model, safe='')}/infer"
        self._parameters = {"top_k": top_k}

    def prepare(self, image: bytes) -> object:
        return self._request(self._path, *v2_binary_request([image], V2_OUTPUTS, self._parameters))

    async def infer(self, payload: object) -> tuple[dict[str, Any], dict[str, list[Any]]]:
        """Send one prepared request; its answer's JSON header and outputs, read as binary."""
        return v2_answer(await self._post(payload))

    async def send(self, payload: object) -> int | None:
        document, outputs = await self.infer(payload)
        if tuple(outputs) != V2_OUTPUTS:
            raise RequestFailed("v2_outputs")
        return int(document["model_version"])


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
    """spec: {"kind": "graft-http" | "graft-v2" | "graft-grpc" | "tutorial" | "kserve", "url" |
    "address", "model", "client": "raw" | "httpx" (HTTP only, default raw)}."""
    kind, client = spec["kind"], spec.get("client", "raw")
    if kind == "graft-http":
        return GraftHttp(spec["url"], concurrency, client, spec["model"])
    if kind == "graft-v2":
        return GraftV2(spec["url"], concurrency, client, spec["model"])
    if kind == "graft-grpc":
        return GraftGrpc(spec["address"], spec["model"])
    if kind == "tutorial":
        return TutorialHttp(spec["url"], concurrency, client)
    if kind == "kserve":
        return KServeV1(spec["url"], concurrency, client, spec["model"])
    raise ValueError(f"unknown target kind {kind!r}")
