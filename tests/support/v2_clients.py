"""What the tests of outside V2 clients share (tests/test_v2_clients.py: NVIDIA's tritonclient,
tests/test_v2_kserve_client.py: KServe's own): the photos they send, graft's own /classify
answers to compare with, and running a client's calls script from that client's venv.

Each client lives in a venv of its own that `make setup` builds (the clients pin protobuf < 7,
graft has 7); its script makes the calls in a subprocess and prints them as JSON, each output
as {"dtype", "shape", "data"}. The graft server itself is conftest.py's `v2_server` fixture.
"""

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data as photos_data

from support.server import RunningServer
from support.trained import COLOURS

MODEL = "colours"
TESTS = Path(__file__).resolve().parents[1]
SIZE = 48  # small images keep the suites fast
TOLERANCE = 1e-6


def tinted(colour: str) -> np.ndarray:
    """scikit-image's astronaut, SIZE x SIZE, the channels other than `colour` dimmed."""
    pixels = np.asarray(Image.fromarray(photos_data.astronaut()).resize((SIZE, SIZE)), np.float32)
    for channel in range(3):
        if channel != COLOURS.index(colour):
            pixels[..., channel] *= 0.25
    return pixels.astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def client_python(venv: str, setup_script: str, client: str) -> Path:
    """tests/<venv>'s python; a missing venv fails the tests (CI runs `make setup`)."""
    python = TESTS / venv / "bin" / "python"
    if not python.exists():
        pytest.fail(
            f"{python.relative_to(TESTS.parent)} is missing: `make setup` builds it "
            f"(tests/{setup_script}), the venv these tests run {client} from"
        )
    return python


def run_client_calls(
    python: Path,
    script: str,
    server: RunningServer,
    photos: dict[str, bytes],
    pixels: np.ndarray,
    folder: Path,
) -> dict[str, Any]:
    """Run support/<script> with `python` against `server`: `script HTTP_HOSTPORT
    GRPC_HOSTPORT MODEL IMAGE_DIR`, IMAGE_DIR holding the photos, `photos.json` (their names
    in order) and `pixels.npy`. Returns the JSON object it prints."""
    for name, photo in photos.items():
        (folder / name).write_bytes(photo)
    (folder / "photos.json").write_text(json.dumps(list(photos)))
    np.save(folder / "pixels.npy", pixels)
    http = server.http.removeprefix("http://")
    command = [str(python), str(TESTS / "support" / script), http, str(server.grpc_target)]
    done = subprocess.run(
        [*command, MODEL, str(folder)], capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stderr}\n{server.log_tail()}"
    return json.loads(done.stdout)


def classify(server: RunningServer, photos: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """graft's own answer for each photo: /classify, every class in top_k."""
    files = [
        ("images", (name, photo, "application/octet-stream")) for name, photo in photos.items()
    ]
    response = httpx.post(f"{server.http}/classify", files=files, data={"top_k": "3"}, timeout=60)
    assert response.status_code == 200, response.text
    return dict(zip(photos, response.json()["results"], strict=True))


def output_data(outputs: dict[str, Any], name: str) -> list[Any]:
    return outputs[name]["data"]


def assert_matches_classify(outputs: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    """V2 outputs `label`, `probabilities` and `score` are /classify's answers, in order."""
    assert output_data(outputs, "label") == [result["label"] for result in expected]
    for row, score, result in zip(
        output_data(outputs, "probabilities"), output_data(outputs, "score"), expected, strict=True
    ):
        by_label = {top["label"]: top["score"] for top in result["top_k"]}
        np.testing.assert_allclose(row, [by_label[label] for label in COLOURS], atol=TOLERANCE)
        assert score == pytest.approx(result["score"], abs=TOLERANCE)
