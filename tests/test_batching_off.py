"""GRAFT_MAX_BATCH_SIZE=1 turns adaptive batching off: every request is its own inference call.

This is the "batching off" peer of the benchmark, so it must start and answer correctly.
"""

import concurrent.futures
from pathlib import Path

import httpx
from support.metrics import histogram
from support.server import running_server
from support.trained import COLOURS, tinted_photo

MODEL = "colours"


def test_batch_size_one_serves_every_request_alone(colour_model_root: Path) -> None:
    photos = {colour: tinted_photo(colour) for colour in COLOURS}
    with running_server(
        colour_model_root, default_model=MODEL, env={"GRAFT_MAX_BATCH_SIZE": "1"}
    ) as server:

        def one(i: int) -> bool:
            colour = COLOURS[i % 3]
            files = [("images", ("photo.jpg", photos[colour], "image/jpeg"))]
            response = httpx.post(f"{server.http}/classify", files=files, timeout=60)
            assert response.status_code == 200, response.text
            return response.json()["results"][0]["label"] == colour

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert all(pool.map(one, range(32)))
        metrics = httpx.get(f"{server.http}/metrics", timeout=10).text

    batches = histogram(metrics, "graft_inference_batch_size", MODEL)
    assert batches["count"] >= 32
    assert batches["count"] == batches["sum"], "a batch held more than one image"
