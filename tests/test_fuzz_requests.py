"""Fuzzing the HTTP request parsing: whatever the body and content type, parsing either yields
images or raises a GraftError with a 4xx status. Real Starlette requests, real parsers."""

import asyncio
import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from service.errors import GraftError
from service.protocol.http.bodies import classify_input, json_body, tf_instances

FUZZ = settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "application/json; charset=utf-16",
        "multipart/form-data; boundary=xyz",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "text/plain",
        "application/vnd.bentoml+pickle",
        "image/jpeg",
        "Application/JSON",
    ]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
B64_LIKE = st.one_of(
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=40),
)


def request(body: bytes, content_type: str | None, path: str = "/classify") -> Request:
    headers = [(b"content-type", content_type.encode())] if content_type is not None else []
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers,
        "query_string": b"",
    }
    chunks = [body]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop() if chunks else b"", "more_body": False}

    return Request(scope, receive)


def classify(body: bytes, content_type: str | None) -> None:
    try:
        images, _ = asyncio.run(classify_input(request(body, content_type)))
    except GraftError as error:
        assert 400 <= error.http_status < 500 and error.message, error
    else:
        assert all(isinstance(image, bytes) for image in images)


def tf_predict(body: bytes) -> None:
    try:
        payload = asyncio.run(json_body(request(body, "application/json")))
        images, _ = tf_instances(payload)
    except GraftError as error:
        assert 400 <= error.http_status < 500 and error.message, error
    else:
        assert all(isinstance(image, bytes) for image in images)


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "xyz") -> bytes:
    out = b""
    for name, filename, payload in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += payload + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@FUZZ
@given(body=st.binary(max_size=300), content_type=CONTENT_TYPES)
def test_fuzz_raw_bodies(body: bytes, content_type: str | None) -> None:
    classify(body, content_type)


@FUZZ
@given(document=JSON)
def test_fuzz_json_documents_on_both_routes(document: Any) -> None:
    body = json.dumps(document).encode()
    classify(body, "application/json")
    tf_predict(body)


@FUZZ
@given(
    images=st.lists(st.fixed_dictionaries({"b64": B64_LIKE}), max_size=4),
    extra=st.dictionaries(st.sampled_from(["model", "version", "top_k"]), JSON, max_size=3),
    shape=st.sampled_from(["classify", "instances", "inputs", "inputs-dict"]),
)
def test_fuzz_almost_valid_documents(images: list, extra: dict, shape: str) -> None:
    if shape == "classify":
        classify(json.dumps({"images": images, **extra}).encode(), "application/json")
        return
    document = {
        "instances": {"instances": images},
        "inputs": {"inputs": images},
        "inputs-dict": {"inputs": {"images": images}},
    }[shape]
    tf_predict(json.dumps(document).encode())


@FUZZ
@given(
    parts=st.lists(
        st.tuples(
            st.sampled_from(["images", "model", "version", "top_k", "other"]),
            st.one_of(st.none(), st.sampled_from(["a.jpg", "", "x\\y.png"])),
            st.binary(max_size=60),
        ),
        max_size=5,
    ),
    cut=st.integers(0, 400),
)
def test_fuzz_multipart_forms(parts: list, cut: int) -> None:
    body = multipart(parts)
    classify(body, "multipart/form-data; boundary=xyz")
    classify(body[:cut], "multipart/form-data; boundary=xyz")  # truncated anywhere


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_json_is_a_400(depth: int) -> None:
    body = b"[" * depth + b"]" * depth
    classify(body, "application/json")
    tf_predict(body)
    classify(b'{"images": ' + body + b"}", "application/json")
