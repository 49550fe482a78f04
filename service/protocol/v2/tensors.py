"""The Open Inference Protocol's tensors for graft's models, free of any transport.

Inputs (exactly one per request):
- `images`: BYTES [N], one encoded JPEG/PNG/BMP/GIF per element. In JSON, which has no bytes,
  each element is the image in base64.
- `pixels`: UINT8 [N, H, W, 3], row-major RGB; turned into lossless PNGs (in a thread).

Outputs, in this order unless the request's `outputs` names some: `probabilities` FP32 [N, C]
(label order), `label` BYTES [N] and `score` FP32 [N] (top-1), and with `parameters.top_k` = k
also `top_k_label` BYTES [N, k] and `top_k_score` FP32 [N, k], most probable first. Versions
trained with the out-of-distribution flag also answer `ood_score` FP32 [N] and
`in_distribution` BOOL [N] (left out for older versions, even when named).

Counts and sizes are checked against the shape and the server's limits before any per-image
work or allocation.
"""

import asyncio
import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import BadRequest
from service.gateway import Gateway, Prediction
from service.gateway.pixels import pixel_images
from service.gateway.results import image_result
from service.protocol.v2.binary import deserialize_bytes, serialize_bytes
from service.schemas import DEFAULT_TOP_K
from service.store.layout import OOD_FLAG_OUTPUT, OOD_OUTPUTS, OOD_SCORE_OUTPUT

IMAGES, PIXELS = "images", "pixels"
BYTES, UINT8, FP32, BOOL = "BYTES", "UINT8", "FP32", "BOOL"
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
DATATYPES += ("FP16", "FP32", "FP64", "BF16", BYTES)
OUTPUT_DATATYPES = {
    "probabilities": FP32,
    "label": BYTES,
    "score": FP32,
    "top_k_label": BYTES,
    "top_k_score": FP32,
    OOD_SCORE_OUTPUT: FP32,
    OOD_FLAG_OUTPUT: BOOL,
}
TOP_K_OUTPUTS = ("top_k_label", "top_k_score")
DEFAULT_OUTPUTS = ("probabilities", "label", "score", *OOD_OUTPUTS)
MAX_DIM = 2**63 - 1  # int64, the protocol's shape type
MAX_RANK = 8  # more dimensions than any input has: refused before the shape is echoed


@dataclass(frozen=True)
class TensorMeta:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


INPUTS = (TensorMeta(IMAGES, BYTES, (-1,)), TensorMeta(PIXELS, UINT8, (-1, -1, -1, 3)))


def output_metadata(classes: int, ood: bool = False) -> tuple[TensorMeta, ...]:
    """The outputs of a version with `classes` labels (`ood`: with the OOD flag)."""
    shapes = {"probabilities": (-1, classes), "top_k_label": (-1, -1), "top_k_score": (-1, -1)}
    return tuple(
        TensorMeta(name, datatype, shapes.get(name, (-1,)))
        for name, datatype in OUTPUT_DATATYPES.items()
        if ood or name not in OOD_OUTPUTS
    )


@dataclass(frozen=True)
class Raw:
    """A tensor's bytes in the protocol's raw layout (binary extension, raw_input_contents)."""

    data: bytes
    where: str  # for messages: e.g. "input `images` (binary data)"


@dataclass(frozen=True)
class Elements:
    """A tensor's elements, already flat (gRPC typed contents) or as JSON `data`."""

    values: Any
    where: str
    json: bool = False  # JSON `data`: BYTES in base64, nesting allowed


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Raw | Elements


MAX_NAME = 64  # input and output names are echoed in messages


def checked_name(name: str, kind: str = "input") -> str:
    if len(name) > MAX_NAME:
        raise BadRequest(
            f"an {kind} name is {len(name)} characters long; graft's inputs are `{IMAGES}` and "
            f"`{PIXELS}`, its outputs {', '.join(OUTPUT_DATATYPES)}"
        )
    return name


def checked_shape(shape: Any, name: str) -> tuple[int, ...]:
    """A declared shape: a list of integers, each 0 <= dim < 2**63."""
    if not isinstance(shape, list | tuple) or any(
        isinstance(dim, bool) or not isinstance(dim, int) for dim in shape
    ):
        raise BadRequest(f"input `{name}`: shape must be a list of integers, got {shape!r:.80}")
    if len(shape) > MAX_RANK:
        raise BadRequest(
            f"input `{name}`: shape has {len(shape)} dimensions; `{IMAGES}` has 1, `{PIXELS}` 4"
        )
    if any(dim < 0 or dim > MAX_DIM for dim in shape):
        raise BadRequest(
            f"input `{name}`: shape {list(shape)} has a dimension out of range; every dimension "
            "is a size, 0 <= dim < 2**63 (no -1 in a request)"
        )
    return tuple(shape)


async def request_images(inputs: list[InputTensor], gateway: Gateway) -> list[bytes]:
    """The request's one input -> encoded images for the Gateway."""
    if len(inputs) != 1 or inputs[0].name not in (IMAGES, PIXELS):
        names = [tensor.name for tensor in inputs]
        raise BadRequest(
            f"send exactly one input, `{IMAGES}` (BYTES [N], encoded images) or `{PIXELS}` "
            f"(UINT8 [N, H, W, 3]); got {names}"
        )
    tensor = inputs[0]
    _check_datatype(tensor)
    if tensor.name == IMAGES:
        return _images(tensor, gateway)
    pixels = _pixels_shape(tensor, gateway)
    return await asyncio.to_thread(_pixel_images, tensor, pixels)


def _check_datatype(tensor: InputTensor) -> None:
    if tensor.datatype not in DATATYPES:
        raise BadRequest(
            f"input `{tensor.name}`: unknown datatype {tensor.datatype!r:.40}; the protocol's are "
            f"{', '.join(DATATYPES)}"
        )
    wanted = BYTES if tensor.name == IMAGES else UINT8
    if tensor.datatype != wanted:
        what = "encoded images" if tensor.name == IMAGES else "RGB pixels"
        raise BadRequest(
            f"input `{tensor.name}` must be {wanted} ({what}), got {tensor.datatype:.40}; send "
            f"encoded images as `{IMAGES}` BYTES [N], decoded pixels as `{PIXELS}` UINT8 "
            "[N, H, W, 3]"
        )


def _images(tensor: InputTensor, gateway: Gateway) -> list[bytes]:
    if len(tensor.shape) != 1:
        raise BadRequest(
            f"input `{IMAGES}` must have shape [N] (one encoded image per element), "
            f"got {list(tensor.shape)}"
        )
    count = tensor.shape[0]
    gateway.check_image_count(count)
    data = tensor.data
    if isinstance(data, Raw):
        return deserialize_bytes(data.data, count, data.where)
    values = _flat_elements(data, count, tensor.shape)
    if data.json:
        return [_base64(value, index, data.where) for index, value in enumerate(values)]
    return list(values)


def _base64(value: Any, index: int, where: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{where}: element {index} must be a base64 string, got {value!r:.40}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(
            f"{where}: element {index} is not valid base64; JSON `data` carries each image "
            "in base64, or send raw bytes with the binary tensor data extension"
        ) from None


def _flat_elements(data: Elements, count: int, shape: tuple[int, ...]) -> Any:
    values = data.values
    if data.json and not isinstance(values, list):
        raise BadRequest(f"{data.where} must be a list of {count} base64 strings")
    if len(values) != count:
        raise BadRequest(
            f"{data.where} has {len(values)} elements but shape {list(shape)} holds {count}"
        )
    return values


def _pixels_shape(tensor: InputTensor, gateway: Gateway) -> tuple[int, int, int, int]:
    shape = tensor.shape
    if len(shape) != 4 or shape[3] != 3:
        raise BadRequest(f"input `{PIXELS}` must have shape [N, H, W, 3] (RGB), got {list(shape)}")
    count, height, width, _ = shape
    gateway.check_pixel_images(count, height, width)
    elements = math.prod(shape)
    data = tensor.data
    if isinstance(data, Raw) and len(data.data) != elements:
        raise BadRequest(
            f"{data.where} has {len(data.data)} bytes but shape {list(shape)} holds "
            f"{elements} UINT8 elements"
        )
    return count, height, width, 3


def _pixel_images(tensor: InputTensor, shape: tuple[int, int, int, int]) -> list[bytes]:
    data = tensor.data
    if isinstance(data, Raw):
        flat = np.frombuffer(data.data, dtype=np.uint8)
    else:
        flat = _pixel_values(data, shape)
    return pixel_images(flat.reshape(shape))


def _pixel_values(data: Elements, shape: tuple[int, ...]) -> np.ndarray:
    """JSON `data` (flat or nested as the shape) or typed contents -> flat uint8 values."""
    count = math.prod(shape)
    if not data.json and len(data.values) != count:
        raise BadRequest(
            f"{data.where} has {len(data.values)} values but shape {list(shape)} holds {count}"
        )
    try:
        values = np.asarray(data.values)
    except ValueError:  # ragged nesting
        raise BadRequest(
            f"{data.where} is not a rectangular array of shape {list(shape)}"
        ) from None
    if values.shape not in ((count,), shape):
        raise BadRequest(
            f"{data.where} has shape {list(values.shape)} ({values.size} values) but the "
            f"input declares {list(shape)}; send it flat (row-major) or nested as declared"
        )
    if values.dtype.kind not in "iu" or (values.size and (values.min() < 0 or values.max() > 255)):
        raise BadRequest(f"{data.where}: UINT8 values must be integers from 0 to 255")
    return values.astype(np.uint8).reshape(-1)


# -- outputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray | list[bytes]  # FP32: float32 array; BOOL: bool array; BYTES: elements

    def raw(self) -> bytes:
        if isinstance(self.values, np.ndarray) and self.datatype == BOOL:
            return np.ascontiguousarray(self.values, dtype=bool).tobytes()  # one byte each
        if isinstance(self.values, np.ndarray):
            return np.ascontiguousarray(self.values, dtype="<f4").tobytes()
        return serialize_bytes(self.values)

    def flat(self) -> list[Any]:
        """Row-major elements: floats, or BYTES as text (labels are UTF-8)."""
        if isinstance(self.values, np.ndarray):
            return self.values.reshape(-1).tolist()
        return [value.decode() for value in self.values]


def top_k_parameter(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"parameters.top_k must be an integer >= 1, got {value!r:.40}")
    return value


def output_names(requested: list[str] | None, top_k: int | None) -> list[str]:
    """The outputs to send: the requested ones, checked, or the defaults."""
    if requested is None:
        return [*DEFAULT_OUTPUTS, *(TOP_K_OUTPUTS if top_k else ())]
    unknown = [name for name in requested if name not in OUTPUT_DATATYPES]
    if unknown:
        raise BadRequest(
            f"unknown output {checked_name(unknown[0], 'output')!r}; graft models have "
            f"{', '.join(OUTPUT_DATATYPES)}"
        )
    if len(set(requested)) != len(requested):
        raise BadRequest(f"outputs names an output twice: {requested}")
    return requested


def build_outputs(
    prediction: Prediction, names: list[str], top_k: int | None
) -> list[OutputTensor]:
    wants_top_k = any(name in TOP_K_OUTPUTS for name in names)
    # top_k_* requested without parameters.top_k: as many as /classify ranks by default.
    columns = _columns(prediction, (top_k or DEFAULT_TOP_K) if wants_top_k else None)
    return [
        OutputTensor(name, OUTPUT_DATATYPES[name], *columns[name])
        for name in names
        if name in columns  # the OOD outputs of a version without them
    ]


Column = tuple[tuple[int, ...], np.ndarray | list[bytes]]


def _columns(prediction: Prediction, top_k: int | None) -> dict[str, Column]:
    probabilities = prediction.probabilities
    count = len(probabilities)
    labels, scores = prediction.top1()
    columns: dict[str, Column] = {
        "probabilities": (tuple(probabilities.shape), probabilities),
        "label": ((count,), [label.encode() for label in labels]),
        "score": ((count,), np.asarray(scores, dtype=np.float32)),
    }
    if prediction.ood_score is not None and prediction.in_distribution is not None:
        columns[OOD_SCORE_OUTPUT] = ((count,), prediction.ood_score.astype(np.float32))
        columns[OOD_FLAG_OUTPUT] = ((count,), prediction.in_distribution.astype(bool))
    if top_k is not None:
        k = min(top_k, len(prediction.labels))
        rows = [image_result(row, prediction.labels, k).top_k for row in probabilities]
        top_labels = [top.label.encode() for row in rows for top in row]
        top_scores = np.asarray([[top.score for top in row] for row in rows], dtype=np.float32)
        columns["top_k_label"] = ((count, k), top_labels)
        columns["top_k_score"] = ((count, k), top_scores)
    return columns
