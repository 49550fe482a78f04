"""Open Inference Protocol calls made with NVIDIA's tritonclient, for tests/test_v2_clients.py.

Run by tests/.venv-tritonclient's python (`make setup` builds it), never imported by graft's
tests: tritonclient needs protobuf < 7, and its `inference.*` messages clash with graft's stubs
in one process. Usage:

    python triton_calls.py HTTP_HOSTPORT GRPC_HOSTPORT MODEL IMAGE_DIR

IMAGE_DIR holds `photos.json` (a list of image file names) and `pixels.npy` (uint8 [n, h, w, 3]).
Prints one JSON object: each call's outputs (name -> {"datatype", "shape", "data"}) or error.
"""

import base64
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

ALL_OUTPUTS = ("probabilities", "label", "score", "top_k_label", "top_k_score")


def _tensors(result: Any, names: list[str]) -> dict[str, Any]:
    found = {}
    for name in names:
        array = result.as_numpy(name)
        if array is None:
            continue
        if array.dtype == np.object_:
            data = [value.decode() if isinstance(value, bytes) else value for value in array.flat]
            data = np.asarray(data, dtype=object).reshape(array.shape).tolist()
        else:
            data = array.tolist()
        found[name] = {"dtype": str(array.dtype), "shape": list(array.shape), "data": data}
    return found


def _error(call: Any) -> dict[str, Any]:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    return {"status": "no error"}


def _http_calls(client: Any, model: str, photos: list[bytes], pixels: np.ndarray) -> dict:
    binary = httpclient.InferInput("images", [len(photos)], "BYTES")
    binary.set_data_from_numpy(np.array(photos, dtype=np.object_))  # binary_data=True: default
    as_json = httpclient.InferInput("images", [len(photos)], "BYTES")
    encoded = [base64.b64encode(photo) for photo in photos]
    as_json.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=False)
    json_out = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ALL_OUTPUTS[:3]]
    mixed_out = [
        httpclient.InferRequestedOutput("label", binary_data=False),
        httpclient.InferRequestedOutput("probabilities", binary_data=True),
        httpclient.InferRequestedOutput("top_k_score", binary_data=True),
    ]
    pixel_input = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    pixel_input.set_data_from_numpy(pixels)
    json_result = client.infer(model, [as_json], outputs=json_out, request_id="json-1")
    binary_result = client.infer(model, [binary], parameters={"top_k": 2}, request_id="bin-1")
    mixed = client.infer(model, [binary], model_version="1", outputs=mixed_out)
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": [client.is_model_ready(model), client.is_model_ready(model, "1")],
        "server_metadata": client.get_server_metadata(),
        "model_metadata": client.get_model_metadata(model),
        "json": _tensors(json_result, list(ALL_OUTPUTS)),
        "json_response": json_result.get_response(),
        "binary": _tensors(binary_result, list(ALL_OUTPUTS)),
        "binary_response": binary_result.get_response(),
        "mixed": _tensors(mixed, list(ALL_OUTPUTS)),
        "mixed_response": mixed.get_response(),
        "pixels": _tensors(client.infer(model, [pixel_input]), list(ALL_OUTPUTS)),
        "unknown_model": _error(lambda: client.infer("no-such-model", [binary])),
        "unknown_version": _error(lambda: client.infer(model, [binary], model_version="99")),
    }


def _grpc_calls(client: Any, model: str, photos: list[bytes], pixels: np.ndarray) -> dict:
    images = grpcclient.InferInput("images", [len(photos)], "BYTES")
    images.set_data_from_numpy(np.array(photos, dtype=np.object_))
    pixel_input = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
    pixel_input.set_data_from_numpy(pixels)
    chosen = [grpcclient.InferRequestedOutput(n) for n in ("score", "top_k_label", "label")]
    result = client.infer(model, [images], parameters={"top_k": 3}, request_id="grpc-1")
    subset = client.infer(model, [images], model_version="1", outputs=chosen)
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": [client.is_model_ready(model), client.is_model_ready(model, "1")],
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(model, as_json=True),
        "images": _tensors(result, list(ALL_OUTPUTS)),
        "id": result.get_response().id,
        "subset": _tensors(subset, list(ALL_OUTPUTS)),
        "subset_order": [output.name for output in subset.get_response().outputs],
        "pixels": _tensors(client.infer(model, [pixel_input]), list(ALL_OUTPUTS)),
        "unknown_model": _error(lambda: client.infer("no-such-model", [images])),
        "bad_datatype": _error(lambda: client.infer(model, [_fp32_images()])),
    }


def _fp32_images() -> Any:
    tensor = grpcclient.InferInput("images", [1], "FP32")
    tensor.set_data_from_numpy(np.zeros([1], dtype=np.float32))
    return tensor


def main(http_address: str, grpc_address: str, model: str, image_dir: str) -> None:
    folder = Path(image_dir)
    photos = [
        (folder / name).read_bytes() for name in json.loads((folder / "photos.json").read_text())
    ]
    pixels = np.load(folder / "pixels.npy")
    http = httpclient.InferenceServerClient(http_address)
    grpc_client = grpcclient.InferenceServerClient(grpc_address)
    try:
        found = {
            "http": _http_calls(http, model, photos, pixels),
            "grpc": _grpc_calls(grpc_client, model, photos, pixels),
        }
    finally:
        http.close()
        grpc_client.close()
    print(json.dumps(found))


if __name__ == "__main__":
    main(*sys.argv[1:])
