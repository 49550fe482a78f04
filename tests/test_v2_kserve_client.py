"""The Open Inference Protocol (KServe V2) spoken by KServe's own Python client:
`kserve.InferenceRESTClient` and `kserve.InferenceGRPCClient` with `kserve.InferRequest` /
`InferInput`, against a real `graft serve` on loopback. Their answers must be graft's own
/classify answers for the same images.

kserve cannot share graft's venv (it pins protobuf < 7 and psutil < 6), so it runs from its
own, tests/.venv-kserve, which `make setup` builds; support/kserve_calls.py makes the calls.
"""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.server import RunningServer
from support.trained import COLOURS
from support.v2_clients import (
    MODEL,
    TOLERANCE,
    assert_matches_classify,
    classify,
    client_python,
    encode,
    output_data,
    run_client_calls,
    tinted,
)

pytestmark = pytest.mark.slow

JPEGS = {f"{colour}.jpg": encode(tinted(colour), "JPEG") for colour in COLOURS}
PIXELS = np.stack([tinted(colour) for colour in COLOURS])
# PNG is lossless: /classify of these sees exactly the pixels the `pixels` input is sent.
PNGS = {f"{colour}.png": encode(tinted(colour), "PNG") for colour in COLOURS}


@pytest.fixture(scope="module")
def kserve_python() -> Path:
    """Checked before the server starts: a missing venv fails at once."""
    return client_python(".venv-kserve", "setup_kserve.sh", "KServe's client (kserve)")


@pytest.fixture(scope="module")
def calls(
    kserve_python: Path, v2_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("v2-kserve-images")
    return run_client_calls(kserve_python, "kserve_calls.py", v2_server, JPEGS, PIXELS, folder)


@pytest.fixture(scope="module")
def classified(v2_server: RunningServer) -> dict[str, dict[str, Any]]:
    return classify(v2_server, {**JPEGS, **PNGS})


def _expected(classified: dict[str, dict[str, Any]], photos: dict[str, bytes]) -> list[dict]:
    return [classified[name] for name in photos]


def test_health_through_both_clients(calls: dict[str, Any]) -> None:
    rest, grpc_found = calls["rest"], calls["grpc"]
    assert (rest["live"], rest["ready"], rest["model_ready"]) == (True, True, True)
    assert rest["unknown_model_ready"] is False  # the REST client reads a 404 as not ready
    assert (grpc_found["live"], grpc_found["ready"], grpc_found["model_ready"]) == (
        True, True, True,
    )  # fmt: skip
    assert grpc_found["unknown_model_ready"]["status"] == "NOT_FOUND"


def test_metadata_reads_as_kserves_own_data_models(calls: dict[str, Any]) -> None:
    for side in ("rest", "grpc"):
        server_metadata = calls[side]["server_metadata"]
        assert server_metadata["name"] == "graft", side
        assert "binary_tensor_data" in server_metadata["extensions"], side
        metadata = calls[side]["model_metadata"]
        assert metadata["name"] == MODEL and metadata["versions"] == ["1"], side
        assert metadata["platform"] == "onnxruntime_onnx", side
        shapes = {
            tensor["name"]: (tensor["datatype"], [int(dim) for dim in tensor["shape"]])
            for tensor in metadata["inputs"] + metadata["outputs"]
        }
        assert shapes == {
            "images": ("BYTES", [-1]),
            "pixels": ("UINT8", [-1, -1, -1, 3]),
            "probabilities": ("FP32", [-1, len(COLOURS)]),
            "label": ("BYTES", [-1]),
            "score": ("FP32", [-1]),
            "top_k_label": ("BYTES", [-1, -1]),
            "top_k_score": ("FP32", [-1, -1]),
        }, side


def test_rest_images_answer_as_classify(calls: dict[str, Any], classified: dict) -> None:
    rest, expected = calls["rest"], _expected(classified, JPEGS)
    for key in ("images", "images_json"):  # binary tensor data in; base64 in JSON `data`
        assert list(rest[key]) == ["probabilities", "label", "score"], key
        assert rest[f"{key}_binary"] is False, key  # outputs in JSON unless asked for binary
        assert_matches_classify(rest[key], expected)
    assert rest["images_id"] == "rest-1"
    assert output_data(rest["images"], "label") == list(COLOURS)  # the model sees the colour


def test_rest_binary_outputs_answer_as_classify(calls: dict[str, Any], classified: dict) -> None:
    found, expected = calls["rest"]["images_binary_out"], _expected(classified, JPEGS)
    assert calls["rest"]["images_binary_out_binary"] is True  # parameters.binary_data_output
    assert list(found) == ["probabilities", "label", "score", "top_k_label", "top_k_score"]
    assert_matches_classify(found, expected)
    assert found["top_k_label"]["shape"] == [len(COLOURS), 2]  # parameters.top_k = 2
    for labels, scores, result in zip(
        output_data(found, "top_k_label"), output_data(found, "top_k_score"), expected, strict=True
    ):
        assert labels == [top["label"] for top in result["top_k"][:2]]
        np.testing.assert_allclose(
            scores, [top["score"] for top in result["top_k"][:2]], atol=TOLERANCE
        )


def test_grpc_images_answer_as_classify(calls: dict[str, Any], classified: dict) -> None:
    found, expected = calls["grpc"], _expected(classified, JPEGS)
    for key in ("images", "images_contents"):  # raw_input_contents; typed bytes_contents
        assert_matches_classify(found[key], expected)
    assert (found["images_id"], found["images_version"]) == ("grpc-1", "1")
    assert found["images_contents_version"] == "1"
    top = found["images"]  # parameters.top_k = 3: every class, most probable first
    assert output_data(top, "top_k_label") == [
        [t["label"] for t in result["top_k"]] for result in expected
    ]
    np.testing.assert_allclose(
        output_data(top, "top_k_score"),
        [[t["score"] for t in result["top_k"]] for result in expected],
        atol=TOLERANCE,
    )


def test_pixels_answer_as_their_lossless_photos(calls: dict[str, Any], classified: dict) -> None:
    expected = _expected(classified, PNGS)
    assert [result["label"] for result in expected] == list(COLOURS)
    for side, key in (("rest", "pixels"), ("grpc", "pixels"), ("grpc", "pixels_contents")):
        assert_matches_classify(calls[side][key], expected)
    # JSON `data` in, and only the outputs asked for: `label` in JSON, `score` binary.
    chosen = calls["rest"]["pixels_json"]
    assert list(chosen) == ["label", "score"] and calls["rest"]["pixels_json_binary"] is True
    assert output_data(chosen, "label") == [result["label"] for result in expected]
    np.testing.assert_allclose(
        output_data(chosen, "score"), [result["score"] for result in expected], atol=TOLERANCE
    )


def test_unknown_model_is_the_clients_not_found(calls: dict[str, Any]) -> None:
    rest = calls["rest"]["unknown_model"]  # httpx.HTTPStatusError, graft's `error` in its text
    assert rest["status"] == 404 and "no-such-model" in rest["message"], rest
    grpc_found = calls["grpc"]  # grpc.aio.AioRpcError
    assert grpc_found["unknown_model"]["status"] == "NOT_FOUND", grpc_found["unknown_model"]
    assert "no-such-model" in grpc_found["unknown_model"]["message"]
    assert grpc_found["unknown_version"]["status"] == "NOT_FOUND", grpc_found["unknown_version"]
    assert "99" in grpc_found["unknown_version"]["message"]
