"""Connection and concurrency limits against a real `graft serve` (HTTP and gRPC on loopback).

One worker serves (the limits are per entry worker). Requests are held by clients that stop
sending (HTTP: an upload admitted with `Expect: 100-continue`, then silent; gRPC: open
streams), so that the limits are reached the same way on any machine. The timeouts are
short here, and every wait for the server to cut a connection has a bound well above them.
"""

import base64
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from queue import SimpleQueue

import grpc
import httpx
import pytest
from PIL import Image
from support.images import encode
from support.server import RunningServer, running_server

from service.stubs.graft.v1 import classifier_pb2 as pb
from service.stubs.graft.v1 import classifier_pb2_grpc as pb_grpc
from service.units import MiB

pytestmark = pytest.mark.slow
MAX_REQUESTS = 4
MAX_BODY = 1 * MiB
BODIES_IN_FLIGHT = 3 * MiB
HEADER_TIMEOUT_S = 3.0
BODY_TIMEOUT_S = 20.0  # the stalled uploads' probes must be done by then
MAX_RPCS = 2
CUT_WITHIN_S = 60.0  # how long a test waits for the server to cut a slow client


@pytest.fixture(scope="module")
def server(colour_model_root: Path) -> Iterator[RunningServer]:
    env = {
        "GRAFT_MAX_CONCURRENT_REQUESTS": str(MAX_REQUESTS),
        "GRAFT_MAX_BODY_BYTES": str(MAX_BODY),
        "GRAFT_MAX_BODY_BYTES_IN_FLIGHT": str(BODIES_IN_FLIGHT),
        "GRAFT_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "GRAFT_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "GRAFT_GRPC_MAX_CONCURRENT_RPCS": str(MAX_RPCS),
        "GRAFT_REQUEST_TIMEOUT_S": "60",
    }
    with running_server(colour_model_root, default_model="colours", grpc=True, env=env) as running:
        yield running


def red_png() -> bytes:
    return encode(Image.new("RGB", (32, 32), (200, 10, 10)), "PNG")


def classify(server: RunningServer, timeout: float = 90) -> httpx.Response:
    body = {"images": [{"b64": base64.b64encode(red_png()).decode()}]}
    return httpx.post(f"{server.http}/classify", json=body, timeout=timeout)


def connect(server: RunningServer) -> socket.socket:
    host, port = server.http.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=CUT_WITHIN_S)
    return sock


def stalled_upload(server: RunningServer, declared: int) -> socket.socket:
    """A /classify upload that sends its headers and then nothing: returns once the server has
    admitted it (`Expect: 100-continue` is answered when the route starts reading the body)."""
    sock = connect(server)
    sock.sendall(
        b"POST /classify HTTP/1.1\r\nHost: graft\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\n"
        + f"Content-Length: {declared}\r\n".encode()
        + b"Expect: 100-continue\r\n\r\n"
    )
    assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 100"), "the upload was not admitted"
    return sock


def read_until(sock: socket.socket, end: bytes) -> bytes:
    received = b""
    while end not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def read_response(sock: socket.socket) -> bytes:
    """One whole answer with a Content-Length (nothing of a next one)."""
    received = read_until(sock, b"\r\n\r\n")
    head, _, body = received.partition(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in head.lower().split(b"\r\n")[1:])
    while len(body) < int(fields[b"content-length"]):
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout fails the test)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def cut_while_trickling(sock: socket.socket, prefix: bytes, trickle: bytes) -> float:
    """Send `prefix`, then `trickle` one byte every 0.2 s; the seconds until the server closed
    the connection (fails if it is still open after CUT_WITHIN_S)."""
    started = time.monotonic()
    sock.sendall(prefix)
    sock.settimeout(0.2)
    for byte in trickle * 1000:
        assert time.monotonic() - started < CUT_WITHIN_S, "the slow client was never cut off"
        try:
            sock.send(bytes([byte]))
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
    pytest.fail("the trickle ended before the server cut the connection")


# -- HTTP: requests and bodies in flight -------------------------------------------------------


def test_requests_beyond_the_cap_get_503_with_retry_after_and_probes_still_answer(
    server: RunningServer,
) -> None:
    stalled = [stalled_upload(server, 10) for _ in range(MAX_REQUESTS)]
    started = time.monotonic()
    try:
        refused = classify(server, timeout=10)
        metadata = httpx.get(f"{server.http}/v1/models/colours", timeout=10)
        livez = httpx.get(f"{server.http}/livez", timeout=10)
        readyz = httpx.get(f"{server.http}/readyz", timeout=10)
        metrics = httpx.get(f"{server.http}/metrics", timeout=10)
        assert time.monotonic() - started < BODY_TIMEOUT_S, "probed too late: raise the timeout"
    finally:
        for sock in stalled:
            sock.close()  # the client goes away: its slot is freed
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "overloaded"
    assert "GRAFT_MAX_CONCURRENT_REQUESTS" in refused.json()["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert metadata.status_code == 503, "every route counts, not only inference"
    assert livez.status_code == 200 and readyz.status_code == 200
    assert metrics.status_code == 200
    assert 'graft_requests_rejected_total{reason="overloaded"}' in metrics.text
    assert_served_again(server)


def assert_served_again(server: RunningServer) -> None:
    """The slots and bytes of requests that ended (cut off, or gone) are free again."""
    deadline = time.monotonic() + CUT_WITHIN_S  # the guard frees them as the app returns
    while (answer := classify(server)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert answer.status_code == 200, answer.text


def test_bodies_in_flight_are_bounded_and_a_stalled_body_is_cut_with_408(
    server: RunningServer,
) -> None:
    # Three stalled uploads declaring 1 MiB each hold the whole 3 MiB of bodies in flight: a
    # fourth body is refused before a byte of it is read (nor spooled to /tmp), while a
    # request without a body is still served.
    stalled = [stalled_upload(server, MAX_BODY) for _ in range(BODIES_IN_FLIGHT // MAX_BODY)]
    started = time.monotonic()
    try:
        refused = classify(server, timeout=10)
        bodiless = httpx.get(f"{server.http}/v1/models/colours", timeout=10)
        cut = [read_to_close(sock) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
    waited = time.monotonic() - started
    assert refused.status_code == 503, refused.text
    assert "GRAFT_MAX_BODY_BYTES_IN_FLIGHT" in refused.json()["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert bodiless.status_code == 200, bodiless.text
    for answer in cut:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"connection: close" in head.lower()
        assert b"GRAFT_BODY_TIMEOUT_S" in body
    assert BODY_TIMEOUT_S <= waited < CUT_WITHIN_S
    assert_served_again(server)


def test_a_body_sent_a_byte_at_a_time_is_cut_off(server: RunningServer) -> None:
    with connect(server) as sock:
        head = (
            b"POST /classify HTTP/1.1\r\nHost: graft\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        elapsed = cut_while_trickling(sock, head, b'{"images": [')
    assert BODY_TIMEOUT_S <= elapsed < CUT_WITHIN_S
    assert classify(server).status_code == 200


# -- HTTP: slow and idle connections ------------------------------------------------------------


def test_headers_sent_a_byte_at_a_time_are_cut_off(server: RunningServer) -> None:
    with connect(server) as sock:
        head = b"GET /livez HTTP/1.1\r\nHost: graft\r\n"
        elapsed = cut_while_trickling(sock, head, b"X-a: b\r\n")
    assert HEADER_TIMEOUT_S <= elapsed < CUT_WITHIN_S


def test_a_connection_that_sends_nothing_is_closed(server: RunningServer) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        assert read_to_close(sock) == b""
    assert HEADER_TIMEOUT_S <= time.monotonic() - started < CUT_WITHIN_S


def test_a_kept_alive_connection_serves_requests_then_closes_when_idle(
    server: RunningServer,
) -> None:
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: graft\r\n\r\n")
            head = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200"), head
        sock.sendall(b"GET /livez HTTP/1.1\r\n")  # a next request that never completes
        started = time.monotonic()
        read_to_close(sock)
    assert time.monotonic() - started < CUT_WITHIN_S


# -- gRPC -----------------------------------------------------------------------------------------


def test_grpc_calls_beyond_the_cap_get_resource_exhausted(server: RunningServer) -> None:
    request = pb.ClassifyRequest(images=[red_png()])
    with grpc.insecure_channel(server.grpc_target or "") as channel:
        stub = pb_grpc.ImageClassifierStub(channel)
        # Open streams are calls in progress: each holds one of the server's MAX_RPCS.
        senders = [SimpleQueue() for _ in range(MAX_RPCS)]
        streams = [stub.ClassifyStream(iter(queue.get, None), timeout=90) for queue in senders]
        for queue, stream in zip(senders, streams, strict=True):
            queue.put(request)
            assert next(stream).results[0].label == "red"  # the call is running on the server
        with pytest.raises(grpc.RpcError) as refused:
            stub.Classify(request, timeout=10)
        livez = httpx.get(f"{server.http}/livez", timeout=10)
        for queue, stream in zip(senders, streams, strict=True):
            queue.put(None)  # the client ends its stream: the call ends
            assert list(stream) == []
        after = stub.Classify(request, timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert livez.status_code == 200
    assert after.results[0].label == "red"


def test_a_body_limit_over_the_bodies_in_flight_is_refused_at_start() -> None:
    from pydantic import ValidationError

    from service.settings import GraftSettings

    with pytest.raises(ValidationError, match="GRAFT_MAX_BODY_BYTES_IN_FLIGHT"):
        GraftSettings(max_body_bytes=2 * MiB, max_body_bytes_in_flight=MiB)
    assert GraftSettings(max_body_bytes=MiB, max_body_bytes_in_flight=MiB).max_body_bytes == MiB
