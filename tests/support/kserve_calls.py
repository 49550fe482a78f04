"""Open Inference Protocol calls made with KServe's own Python client, for
tests/test_v2_kserve_client.py.

Run by tests/.venv-kserve's python (`make setup` builds it), never imported by graft's tests:
kserve needs protobuf < 7 and psutil < 6. Usage:

    python kserve_calls.py HTTP_HOSTPORT GRPC_HOSTPORT MODEL IMAGE_DIR

IMAGE_DIR holds `photos.json` (a list of image file names) and `pixels.npy` (uint8 [n, h, w, 3]).
Prints one JSON object: each call's outputs (name -> {"dtype", "shape", "data"}) or error.

KServe's clients (`InferenceRESTClient`, `InferenceGRPCClient`) have no metadata calls: server
and model metadata are read with KServe's own REST data models and gRPC stubs instead.
"""

import asyncio
import base64
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from google.protobuf import json_format
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.logging import trace_logger
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from kserve.protocol.infer_type import InferResponse, RequestedOutput
from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse, ServerMetadataResponse
from pydantic import BaseModel

TIMEOUT_S = 60


def _input(name: str, array: np.ndarray, datatype: str, *, binary: bool = True) -> InferInput:
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def _tensors(response: InferResponse) -> dict[str, Any]:
    found = {}
    for output in response.outputs:
        array = output.as_numpy()
        if array.dtype == np.object_:
            data = [value.decode() if isinstance(value, bytes) else value for value in array.flat]
            data = np.asarray(data, dtype=object).reshape(array.shape).tolist()
        else:
            data = array.tolist()
        found[output.name] = {
            "dtype": str(array.dtype),
            "shape": [int(dim) for dim in output.shape],
            "data": data,
        }
    return found


async def _rest_error(call: Any) -> dict[str, Any]:
    try:
        await call
    except httpx.HTTPStatusError as exc:
        return {"status": exc.response.status_code, "message": str(exc)}
    return {"status": "no error"}


async def _grpc_error(call: Any) -> dict[str, Any]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return {"status": exc.code().name, "message": exc.details()}
    return {"status": "no error"}


def _validated(model: type[BaseModel], url: str) -> dict[str, Any]:
    """GET `url` and read the answer with KServe's data model of it (its REST server's)."""
    response = httpx.get(url, timeout=TIMEOUT_S)
    response.raise_for_status()
    return model.model_validate_json(response.content).model_dump()


async def _rest_calls(base: str, model: str, photos: list[bytes], pixels: np.ndarray) -> dict:
    images = np.array(photos, dtype=np.object_)
    encoded = np.array([base64.b64encode(photo) for photo in photos], dtype=np.object_)
    mixed_out = [RequestedOutput("label"), RequestedOutput("score", {"binary_data": True})]
    requests = {  # binary tensor data in, JSON out: the client's defaults
        "images": InferRequest(model, [_input("images", images, "BYTES")], request_id="rest-1"),
        "images_binary_out": InferRequest(
            model,
            [_input("images", images, "BYTES")],
            parameters={"binary_data_output": True, "top_k": 2},
        ),
        "images_json": InferRequest(model, [_input("images", encoded, "BYTES", binary=False)]),
        "pixels": InferRequest(model, [_input("pixels", pixels, "UINT8")]),
        "pixels_json": InferRequest(
            model, [_input("pixels", pixels, "UINT8", binary=False)], request_outputs=mixed_out
        ),
    }
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=TIMEOUT_S))
    try:
        found: dict[str, Any] = {
            "live": await client.is_server_live(base),
            "ready": await client.is_server_ready(base),
            "model_ready": await client.is_model_ready(base, model),
            "unknown_model_ready": await client.is_model_ready(base, "no-such-model"),
            "server_metadata": _validated(ServerMetadataResponse, f"{base}/v2"),
            "model_metadata": _validated(ModelMetadataResponse, f"{base}/v2/models/{model}"),
        }
        for key, request in requests.items():
            headers: dict[str, str] = {}
            response = await client.infer(base, request, model_name=model, response_headers=headers)
            found[key] = _tensors(response)
            found[f"{key}_id"] = response.id
            # Binary tensor data in the answer (the client hides which outputs were binary)
            found[f"{key}_binary"] = INFERENCE_CONTENT_LENGTH_HEADER in headers
        unknown = InferRequest("no-such-model", [_input("images", images, "BYTES")])
        found["unknown_model"] = await _rest_error(
            client.infer(base, unknown, model_name="no-such-model")
        )
    finally:
        await client.close()
    return found


async def _grpc_calls(target: str, model: str, photos: list[bytes], pixels: np.ndarray) -> dict:
    images = np.array(photos, dtype=np.object_)
    requests = {  # raw_input_contents (set_data_from_numpy) or typed contents (data=[...])
        "images": InferRequest(
            model,
            [_input("images", images, "BYTES")],
            request_id="grpc-1",
            parameters={"top_k": 3},
            model_version="1",
        ),
        "images_contents": InferRequest(
            model, [InferInput("images", [len(photos)], "BYTES", photos)]
        ),
        "pixels": InferRequest(model, [_input("pixels", pixels, "UINT8")]),
        "pixels_contents": InferRequest(
            model, [InferInput("pixels", list(pixels.shape), "UINT8", pixels.ravel().tolist())]
        ),
    }
    client = InferenceGRPCClient(target, timeout=TIMEOUT_S)
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # KServe's own stubs, for metadata
    try:
        found: dict[str, Any] = {
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready(model),
            "unknown_model_ready": await _grpc_error(client.is_model_ready("no-such-model")),
            "server_metadata": json_format.MessageToDict(
                await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=TIMEOUT_S)
            ),
            "model_metadata": json_format.MessageToDict(
                await stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=TIMEOUT_S)
            ),
        }
        for key, request in requests.items():
            response = await client.infer(request)
            found[key] = _tensors(response)
            found[f"{key}_id"] = response.id
            found[f"{key}_version"] = response.model_version
        unknown = InferRequest("no-such-model", [_input("images", images, "BYTES")])
        found["unknown_model"] = await _grpc_error(client.infer(unknown))
        unknown_version = InferRequest(
            model, [_input("images", images, "BYTES")], model_version="99"
        )
        found["unknown_version"] = await _grpc_error(client.infer(unknown_version))
    finally:
        await client.close()
        await channel.close()
    return found


async def _calls(http_address: str, grpc_address: str, model: str, image_dir: str) -> dict:
    folder = Path(image_dir)
    names = json.loads((folder / "photos.json").read_text())
    photos = [(folder / name).read_bytes() for name in names]
    pixels = np.load(folder / "pixels.npy")
    return {
        "rest": await _rest_calls(f"http://{http_address}", model, photos, pixels),
        "grpc": await _grpc_calls(grpc_address, model, photos, pixels),
    }


def main(http_address: str, grpc_address: str, model: str, image_dir: str) -> None:
    trace_logger.disabled = True  # the client logs each error it raises, with a traceback
    print(json.dumps(asyncio.run(_calls(http_address, grpc_address, model, image_dir))))


if __name__ == "__main__":
    main(*sys.argv[1:])
