"""The soak's hostile inputs: what an unauthenticated (or wrongly authenticated) client can send,
each with the answers it may get.

Every case is sent as a real client would send it (httpx, raw sockets for what httpx cannot
write, grpc.aio with graft's own generated stubs), and its outcome is one word: an HTTP status
("413"), a gRPC code ("grpc:INVALID_ARGUMENT"), "closed" (the server closed the connection
without an answer), "hang" (nothing within the case's deadline) or "error:<type>" (the client
failed, e.g. a reset connection). A case passes when its outcome is in `expected`.

Names and versions are random per request wherever a server could turn them into a metric
label (issue 17 item 1), so a label leak shows as /metrics growing through the soak. What the
cases cover, by issue 17 item: 1 (names, HTTP and gRPC), 2 (5000-digit integers), 3 (a 2
million image Predict, tall EXIF-rotated JPEGs), 4 (a GIF whose second frame is huge), 5
(Classify amplification), 6 (40 MP PNGs: the worst memory a valid request costs), 7 (slow
headers, a body a byte at a time, a stalled upload), 11 (pax / GNU long-name tar headers, no,
wrong and right token), 13 (a corrupt image in a batch), 15 (BentoML's page), 16 (Content-Type
twice). Item 12 (NaN at run time) needs a model that makes NaN: no real model does, so the soak
has no case for it (tests/test_bad_model_output.py covers it).
"""

import asyncio
import base64
import gzip
import io
import json
import re
import secrets
import struct
import tarfile
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from urllib.parse import urlsplit

import httpx
from PIL import Image

from bench.targets import multipart

HUGE_INT = "9" * 5000  # over Python's 4300-digit int-string limit
SLOW_BYTE_EVERY_S = 0.5
SLACK_S = 15.0  # how long past the server's own timeout a slow case may take before "hang"


@dataclass
class Clients:
    """What the cases send with: one per soak."""

    http: httpx.AsyncClient
    url: str
    model: str
    token: str | None  # the admin token when the soak knows it (management cases need it)
    grpc_target: str | None
    header_timeout_s: float  # the server's GRAFT_HEADER_TIMEOUT_S
    body_timeout_s: float  # the server's GRAFT_BODY_TIMEOUT_S
    _channel: object | None = None

    def channel(self) -> object:
        import grpc

        if self._channel is None:
            # The server's own message limit (32 MiB) applies; the client sends what it is given.
            options = [("grpc.max_send_message_length", 64 * 2**20)]
            self._channel = grpc.aio.insecure_channel(self.grpc_target or "", options=options)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()  # type: ignore[attr-defined]


Send = Callable[[Clients], Awaitable[str]]


@dataclass(frozen=True)
class BadCase:
    name: str
    item: str  # the issue-17 item (or "soak" for the original hostile inputs)
    expected: frozenset[str]
    send: Send
    slow: bool = False  # takes the server's header/body timeout to answer
    heavy: bool = False  # among the inputs that cost the server the most memory


def _outcomes(*values: str) -> frozenset[str]:
    return frozenset(values)


# -- payloads -------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@cache
def one_bit_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of black pixels: tiny on the wire, width x height decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunks = [_png_chunk(b"IHDR", header), _png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


@cache
def corrupt_deflate_png() -> bytes:
    """A PNG whose CRCs are all valid but whose deflate stream is garbage (issue 17 item 13)."""
    header = struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100)[:2] + bytes(range(256)) * 4
    chunks = [_png_chunk(b"IHDR", header), _png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


@cache
def gif_with_huge_second_frame(side: int = 30_000) -> bytes:
    """A 1x1 GIF whose second frame declares side x side (each frame's LZW data is 1 pixel)."""
    out = [b"GIF89a", struct.pack("<HHBBB", 1, 1, 0x80 | 0x70 | 1, 0, 0), bytes(range(12))]
    for width, height in ((1, 1), (side, side)):
        descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
        out.append(descriptor + b"\x02\x02\x4c\x01\x00")
    return b"".join([*out, b"\x3b"])


@cache
def exif_rotated_tall_jpeg(width: int = 300, height: int = 8000) -> bytes:
    """A width x height JPEG with EXIF orientation 6 (shown rotated by 90 degrees)."""
    rows = (255 * (1 - abs(2 * (i / height) - 1)) for i in range(height))
    column = bytes(int(value) for value in rows)
    gray = Image.frombytes("L", (1, height), column).resize((width, height))
    image = Image.merge("RGB", (gray, gray.point(lambda v: v // 2), gray.point(lambda v: 255 - v)))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=60, exif=exif.tobytes())
    return buffer.getvalue()


def multipart_images(images: list[bytes], fields: dict[str, str] | None = None) -> tuple:
    boundary = secrets.token_hex(16)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in (fields or {}).items()
    ]
    for index, image in enumerate(images):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
            f'filename="{index}.jpg"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + image
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@cache
def pax_bomb_push() -> bytes:
    """A tar.gz whose first header is a pax header announcing 6 GiB (only its start is sent:
    the server must refuse it from the header, issue 17 item 11)."""
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 6 * 2**30
    return gzip.compress(pax.tobuf(format=tarfile.USTAR_FORMAT) + bytes(256 * 1024))


@cache
def long_name_chain_push(count: int = 1500) -> bytes:
    """`count` chained GNU long-name headers before one member (RecursionError in tarfile)."""
    out = io.BytesIO()
    for index in range(count):
        name = f"very/long/name/{index:05d}/".encode() * 8
        link = tarfile.TarInfo("././@LongLink")
        link.type, link.size = tarfile.GNUTYPE_LONGNAME, len(name)
        padding = b"\x00" * (-len(name) % tarfile.BLOCKSIZE)
        out.write(link.tobuf(format=tarfile.GNU_FORMAT) + name + padding)
    member = tarfile.TarInfo("graft.json")
    out.write(member.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024))
    return gzip.compress(out.getvalue())


RANDOM_NAME = re.compile(r"m[0-9a-f]{12}\b")  # what _random_name makes: findable in /metrics


def _random_name() -> str:
    return f"m{secrets.token_hex(6)}"


# -- HTTP -----------------------------------------------------------------------------------------


async def _http(
    clients: Clients,
    method: str,
    path: str,
    body: bytes = b"",
    content_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> str:
    sent = {**({"content-type": content_type} if content_type else {}), **(headers or {})}
    try:
        response = await clients.http.request(method, path, content=body, headers=sent)
    except httpx.TimeoutException:
        return "hang"
    except httpx.HTTPError as exc:
        return f"error:{type(exc).__name__}"
    return str(response.status_code)


def _json(document: dict[str, object]) -> bytes:
    """`document` as JSON, every "HUGE" value written as a 5000-digit integer literal."""
    return json.dumps(document).replace('"HUGE"', HUGE_INT).encode()


def _b64(image: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(image).decode()}


def _v2_body(photo: bytes) -> bytes:
    image = {"name": "images", "shape": [1], "datatype": "BYTES", "data": [_b64(photo)["b64"]]}
    return json.dumps({"inputs": [image]}).encode()


def _post_json(path: str, document: Callable[[], bytes]) -> Send:
    return lambda c: _http(c, "POST", path, document(), "application/json")


def _post_images(images: Callable[[], list[bytes]]) -> Send:
    return lambda c: _http(c, "POST", "/classify", *multipart_images(images()))


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def http_cases(photo: bytes, token: str | None) -> list[BadCase]:
    """The HTTP cases. Management cases with the right token only when `token` is known."""
    form = "images"
    tall = exif_rotated_tall_jpeg

    def cases() -> list[BadCase]:
        return [
            BadCase("truncated jpeg", "soak", _outcomes("400"),
                    lambda c: _http(c, "POST", "/classify",
                                    *multipart({}, form, photo[: len(photo) // 2]))),
            BadCase("html as jpeg", "soak", _outcomes("415"),
                    lambda c: _http(c, "POST", "/classify",
                                    *multipart({}, form, b"<!DOCTYPE html><html>hi</html>"))),
            BadCase("zero bytes", "soak", _outcomes("400"),
                    lambda c: _http(c, "POST", "/classify", *multipart({}, form, b""))),
            BadCase("png bomb 20000x20000", "soak", _outcomes("400"),
                    lambda c: _http(c, "POST", "/classify",
                                    *multipart({}, form, one_bit_png(20_000, 20_000)))),
            BadCase("pickle body", "soak", _outcomes("415"),
                    lambda c: _http(c, "POST", "/classify", b"\x80\x04N.",
                                    "application/vnd.bentoml+pickle")),
            BadCase("malformed json", "soak", _outcomes("400"),
                    _post_json("/classify", lambda: b'{"images": [{"b64": ')),
            BadCase("bad base64", "soak", _outcomes("400"),
                    _post_json("/classify", lambda: b'{"images": [{"b64": "@@@"}]}')),
            BadCase("text/plain", "soak", _outcomes("415"),
                    lambda c: _http(c, "POST", "/classify", b"hello", "text/plain")),
            BadCase("random model name", "1", _outcomes("404"),
                    _post_json("/classify", lambda: json.dumps(
                        {"images": [_b64(photo)], "model": _random_name()}).encode())),
            BadCase("1 MB model name", "1", _outcomes("400"),
                    _post_json("/classify", lambda: json.dumps(
                        {"images": [_b64(photo)], "model": "x" * 2**20}).encode())),
            BadCase("random version", "1", _outcomes("404"),
                    _post_json("/classify", lambda: json.dumps(
                        {"images": [_b64(photo)], "version": secrets.randbelow(10**12) + 2}
                    ).encode())),
            BadCase("TF Serving REST, random model", "1", _outcomes("404"),
                    lambda c: _http(c, "POST", f"/v1/models/{_random_name()}:predict",
                                    json.dumps({"instances": [_b64(photo)]}).encode(),
                                    "application/json")),
            BadCase("metadata, random model", "1", _outcomes("404"),
                    lambda c: _http(c, "GET", f"/v1/models/{_random_name()}/metadata")),
            BadCase("V2, random model", "1", _outcomes("404"),
                    lambda c: _http(c, "POST", f"/v2/models/{_random_name()}/infer",
                                    _v2_body(photo), "application/json")),
            BadCase("random path", "1", _outcomes("404"),
                    lambda c: _http(c, "GET", f"/{_random_name()}/{_random_name()}")),
            BadCase("5000-digit top_k", "2", _outcomes("400"),
                    _post_json("/classify", lambda: _json(
                        {"images": [_b64(photo)], "top_k": "HUGE"}))),
            BadCase("5000-digit version", "2", _outcomes("400"),
                    _post_json("/classify", lambda: _json(
                        {"images": [_b64(photo)], "version": "HUGE"}))),
            BadCase("65 EXIF-rotated 300x8000 JPEGs", "3", _outcomes("400"),
                    _post_images(lambda: [tall()] * 65)),
            BadCase("64 EXIF-rotated 300x8000 JPEGs (154 MP to re-encode)", "3",
                    _outcomes("413"), _post_images(lambda: [tall()] * 64)),
            BadCase("6 EXIF-rotated 300x8000 JPEGs (14 MP re-encoded, valid)", "3",
                    _outcomes("200"), _post_images(lambda: [tall()] * 6), heavy=True),
            BadCase("60 EXIF-rotated 300x9000 JPEGs (162 MP)", "3", _outcomes("413"),
                    _post_images(lambda: [tall(300, 9000)] * 60)),
            BadCase("GIF with a 30000x30000 second frame", "4", _outcomes("400"),
                    _post_images(lambda: [gif_with_huge_second_frame()])),
            BadCase("40 MP PNG (valid: classified)", "6", _outcomes("200"),
                    _post_images(lambda: [one_bit_png(8000, 5000)]), heavy=True),
            BadCase("four 40 MP PNGs (160 MP, valid)", "6", _outcomes("200"),
                    _post_images(lambda: [one_bit_png(8000, 5000)] * 4), heavy=True),
            BadCase("40 MP + one row PNG", "6", _outcomes("400"),
                    _post_images(lambda: [one_bit_png(8000, 5001)])),
            BadCase("corrupt deflate PNG among good images", "13", _outcomes("400"),
                    _post_images(lambda: [photo, corrupt_deflate_png(), photo])),
            BadCase("the page at / (no outside host)", "15", _outcomes("200", "404"), _page),
            BadCase("Content-Type twice", "16", _outcomes("400"),
                    lambda c: _raw(c, _two_content_types(photo))),
            BadCase("pax bomb push, no token", "11", _outcomes("401", "403"),
                    lambda c: _http(c, "POST", f"/models/{c.model}/versions", pax_bomb_push(),
                                    "application/gzip")),
            BadCase("pax bomb push, wrong token", "11", _outcomes("401", "403"),
                    lambda c: _http(c, "POST", f"/models/{c.model}/versions", pax_bomb_push(),
                                    "application/gzip", _auth("w" * 32))),
            BadCase("slow headers (slowloris)", "7", _outcomes("closed", "408"),
                    lambda c: _trickle(c, b"GET /livez HTTP/1.1\r\nHost: graft\r\n", b"X-a: b\r\n",
                                       c.header_timeout_s), slow=True),
            BadCase("body a byte at a time", "7", _outcomes("408", "closed"),
                    lambda c: _trickle(c, _stalled_head(100_000), b'{"images": [',
                                       c.header_timeout_s + c.body_timeout_s), slow=True),
            BadCase("stalled 15 MB upload", "7", _outcomes("408", "closed"),
                    lambda c: _stall(c, 15 * 2**20, 2**20), slow=True),
        ]  # fmt: skip

    managed = [
        BadCase("5000-digit pin", "2", _outcomes("400"),
                lambda c: _http(c, "PUT", f"/models/{c.model}/policy",
                                _json({"pin": "HUGE"}), "application/json",
                                _auth(c.token or ""))),
        BadCase("pax bomb push, right token", "11", _outcomes("422"),
                lambda c: _http(c, "POST", f"/models/{c.model}/versions", pax_bomb_push(),
                                "application/gzip", _auth(c.token or ""))),
        BadCase("1500 GNU long names push, right token", "11", _outcomes("422"),
                lambda c: _http(c, "POST", f"/models/{c.model}/versions",
                                long_name_chain_push(), "application/gzip",
                                _auth(c.token or ""))),
    ]  # fmt: skip
    return cases() + (managed if token else [])


OUTSIDE_HOST = re.compile(rb"""(?:src|href)\s*=\s*["']?(?:https?:)?//|googletagmanager""", re.I)


async def _page(clients: Clients) -> str:
    """GET /: graft's own page or a 404, never one that loads anything from another host
    (BentoML's default page loaded Google Tag Manager)."""
    try:
        response = await clients.http.get("/")
    except httpx.HTTPError as exc:
        return f"error:{type(exc).__name__}"
    return "outside-host" if OUTSIDE_HOST.search(response.content) else str(response.status_code)


def _two_content_types(photo: bytes) -> Callable[[Clients], bytes]:
    def request(clients: Clients) -> bytes:
        body = json.dumps({"images": [_b64(photo)]}).encode()
        head = (
            "POST /classify HTTP/1.1\r\nHost: graft\r\nContent-Type: application/json\r\n"
            "Content-Type: application/vnd.bentoml+pickle\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        return head.encode() + body

    return request


def _stalled_head(length: int) -> bytes:
    return (
        "POST /classify HTTP/1.1\r\nHost: graft\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def _open(clients: Clients) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(clients.url)
    return await asyncio.open_connection(parts.hostname, parts.port)


def _status_of(answer: bytes) -> str:
    if not answer:
        return "closed"
    try:
        return answer.split(b" ", 2)[1].decode()
    except IndexError:
        return "error:garbled"


async def _raw(clients: Clients, request: Callable[[Clients], bytes]) -> str:
    """One request written byte for byte (httpx folds repeated headers), read to close."""
    try:
        reader, writer = await _open(clients)
        writer.write(request(clients))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 60)
    except TimeoutError:
        return "hang"
    except OSError as exc:
        return f"error:{type(exc).__name__}"
    writer.close()
    return _status_of(answer)


async def _trickle(clients: Clients, prefix: bytes, trickle: bytes, server_timeout_s: float) -> str:
    """`prefix`, then `trickle` a byte every SLOW_BYTE_EVERY_S until the server answers or
    closes; "hang" if it has done neither SLACK_S after its own timeout."""
    deadline = time.monotonic() + server_timeout_s + SLACK_S
    try:
        reader, writer = await _open(clients)
        writer.write(prefix)
        index = 0
        while time.monotonic() < deadline:
            writer.write(trickle[index % len(trickle) : index % len(trickle) + 1])
            index += 1
            await writer.drain()
            with_answer = await _read_for(reader, SLOW_BYTE_EVERY_S)
            if with_answer is not None:
                writer.close()
                return _status_of(with_answer)
    except (ConnectionError, OSError):
        return "closed"  # the server closed while we were still writing
    writer.close()
    return "hang"


async def _stall(clients: Clients, declared: int, sent: int) -> str:
    """Declare a `declared`-byte body, send `sent` bytes of it, then nothing."""
    deadline = clients.header_timeout_s + clients.body_timeout_s + SLACK_S
    try:
        reader, writer = await _open(clients)
        writer.write(_stalled_head(declared) + b'{"images": [' + b" " * (sent - 12))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), deadline)
    except TimeoutError:
        return "hang"
    except (ConnectionError, OSError):
        return "closed"
    writer.close()
    return _status_of(answer)


async def _read_for(reader: asyncio.StreamReader, seconds: float) -> bytes | None:
    """What the server sent until it closed (b"" if it closed silently), or None if it is
    still open and silent after `seconds`."""
    try:
        first = await asyncio.wait_for(reader.read(65536), seconds)
    except TimeoutError:
        return None
    if not first:
        return b""
    return first + await asyncio.wait_for(reader.read(), 30)


# -- gRPC -----------------------------------------------------------------------------------------


async def _grpc(clients: Clients, method: str, request: object, response: type) -> str:
    import grpc

    call = clients.channel().unary_unary(  # type: ignore[attr-defined]
        method,
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=response.FromString,
    )
    try:
        await call(request, timeout=60)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        return "hang" if code == grpc.StatusCode.DEADLINE_EXCEEDED else f"grpc:{code.name}"
    return "grpc:OK"


def grpc_cases(photo: bytes) -> list[BadCase]:
    from service.stubs.graft.v1 import classifier_pb2 as pb
    from service.stubs.tensorflow.core.example import example_pb2
    from service.stubs.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from service.stubs.tensorflow_serving.apis import classification_pb2, predict_pb2

    classify = "/graft.v1.ImageClassifier/Classify"
    tf_predict = "/tensorflow.serving.PredictionService/Predict"
    tf_classify = "/tensorflow.serving.PredictionService/Classify"

    def graft_classify(model: Callable[[], str]) -> Send:
        return lambda c: _grpc(
            c, classify, pb.ClassifyRequest(model=model(), images=[photo]), pb.ClassifyResponse
        )

    @cache  # built once: the soak's event loop must not spend a second per send on it
    def pixels(model: str, dims: tuple[int, ...], content: int) -> object:
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = model, "serve_pixels"
        shape = [tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in dims]
        request.inputs["pixels"].CopyFrom(
            tensor_pb2.TensorProto(
                dtype=types_pb2.DT_UINT8,
                tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=shape),
                tensor_content=bytes(content),
            )
        )
        return request

    @cache
    def amplified(model: str) -> object:
        request = classification_pb2.ClassificationRequest()
        request.model_spec.name = model
        source = request.input.example_list_with_context
        source.context.features.feature["image/encoded"].bytes_list.value.append(photo)
        source.examples.extend(example_pb2.Example() for _ in range(1_000_000))
        return request

    def tf_random_model() -> object:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = _random_name()
        request.inputs["images"].CopyFrom(
            tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING,
                tensor_shape=tensor_shape_pb2.TensorShapeProto(
                    dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]
                ),
                string_val=[photo],
            )
        )
        return request

    invalid = _outcomes("grpc:INVALID_ARGUMENT")
    return [
        BadCase("gRPC Classify, 3 MB model name", "1", invalid,
                graft_classify(lambda: "x" * 3 * 2**20)),
        BadCase("gRPC Classify, random model", "1", _outcomes("grpc:NOT_FOUND"),
                graft_classify(_random_name)),
        BadCase("TF Serving Predict, random model", "1", _outcomes("grpc:NOT_FOUND"),
                lambda c: _grpc(c, tf_predict, tf_random_model(), predict_pb2.PredictResponse)),
        BadCase("TF Serving Predict [2000000,1,1,3]", "3", invalid,
                lambda c: _grpc(c, tf_predict, pixels(c.model, (2_000_000, 1, 1, 3), 6_000_000),
                                predict_pb2.PredictResponse)),
        BadCase("TF Serving Predict 10000x5000 pixels", "3", invalid,
                lambda c: _grpc(c, tf_predict, pixels(c.model, (1, 10_000, 5_000, 3), 0),
                                predict_pb2.PredictResponse)),
        BadCase("TF Serving Classify, 1M examples x 1 context image", "5", invalid,
                lambda c: _grpc(c, tf_classify, amplified(c.model),
                                classification_pb2.ClassificationResponse)),
    ]  # fmt: skip


def bad_cases(photo: bytes, token: str | None, grpc_on: bool) -> list[BadCase]:
    """Every case the soak mixes into its load (gRPC ones when the server serves gRPC)."""
    return http_cases(photo, token) + (grpc_cases(photo) if grpc_on else [])
