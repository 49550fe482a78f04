"""The accelerated runtimes: the exported network (ONNX) run by ONNX Runtime or OpenVINO.

A `Network` takes float32 pixels [n, s, s, 3] in [0, 255] (the SavedModel's `preprocess`
output) and returns its one output. TensorFlow is not one of them: a version on TensorFlow
runs its SavedModel's `serving_default` whole (service.runtime.loaded_model).

`GRAFT_RUNTIME` picks one: `auto` takes ONNX Runtime when it is installed (the fastest here,
BENCHMARKS.md), else TensorFlow; a named one must be installed or `graft serve` refuses to
start. OpenVINO is never picked by `auto`: importing it loads its telemetry package
(decision 46), so it runs only where a user names it.
"""

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.errors import RejectedModel
from service.runtime.decode_pool import DecodeSettingError, resolve_decode_threads
from service.runtime.devices import (
    CGROUP,
    GPU,
    Device,
    DeviceUnavailable,
    resolve_device,
    usable_cores,
)
from service.settings import GraftSettings
from service.store.layout import ONNX_INPUT, ONNX_OUTPUT

TENSORFLOW = "tensorflow"
ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
ACCELERATED = (ONNXRUNTIME, OPENVINO)
RUNTIMES = ("auto", *ACCELERATED, TENSORFLOW)
AUTO = ONNXRUNTIME  # what `auto` takes when it is installed


class RuntimeUnavailable(RuntimeError):
    """The runtime a setting names cannot run here (not installed, or fails to start)."""


class Network(Protocol):
    runtime: str
    output_names: tuple[str, ...]  # every output of the file

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [n, s, s, 3] -> the network's main output, float32 [n, ...]: `probabilities`
        where the file has it (exports with the out-of-distribution outputs have three), else
        its only output."""
        ...

    def outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [n, s, s, 3] -> every output by name, in its own dtype."""
        ...


def _main_output(names: list[str]) -> str:
    return ONNX_OUTPUT if ONNX_OUTPUT in names else names[0]


@dataclass(frozen=True)
class Engine:
    """Where versions run: `runtime` (resolved, never "auto") with `threads` per call, on
    `device`; an accelerated version's images decoded by `decode_threads` threads."""

    runtime: str = TENSORFLOW
    threads: int = 1
    device: Device = field(default_factory=Device)
    decode_threads: int = 1


def engine_for(settings: GraftSettings) -> Engine:
    """The engine GRAFT_RUNTIME, GRAFT_RUNTIME_THREADS, GRAFT_DEVICE and GRAFT_DECODE_THREADS
    ask for; RuntimeUnavailable (one line, naming the setting) if it cannot be honoured here."""
    try:
        device = resolve_device(settings.device)
        decode_threads = resolve_decode_threads(settings.decode_threads, device)
    except (DeviceUnavailable, DecodeSettingError) as exc:
        raise RuntimeUnavailable(str(exc)) from None
    threads = settings.runtime_threads or default_threads(settings.batch_threads)
    return Engine(resolve(settings.runtime, device), threads, device, decode_threads)


def installed(runtime: str) -> bool:
    module = {ONNXRUNTIME: "onnxruntime", OPENVINO: "openvino"}.get(runtime)
    return runtime == TENSORFLOW or (module is not None and _importable(module))


def resolve(setting: str, device: Device = Device(), name: str = "GRAFT_RUNTIME") -> str:
    """The runtime `name=setting` (the serving setting, or the option of a command) means on
    this machine and `device`; RuntimeUnavailable (one line, naming it) when it cannot be
    honoured."""
    if setting not in RUNTIMES:
        raise RuntimeUnavailable(
            f"{name}={setting[:40]!r} is not a runtime; choose one of {', '.join(RUNTIMES)}"
        )
    if setting == "auto":
        return AUTO if installed(AUTO) and _runs_on(AUTO, device) else TENSORFLOW
    if not installed(setting):
        raise RuntimeUnavailable(
            f"{name}={setting} but the {setting} package is not installed; "
            f"`pip install {setting}`, or use {name}=auto"
        )
    if not _runs_on(setting, device):
        raise RuntimeUnavailable(
            f"{name}={setting} cannot run on GRAFT_DEVICE={device}: "
            + (
                "this onnxruntime has no CUDA provider; `pip install 'graft-serve[gpu]'` "
                "(onnxruntime-gpu)"
                if setting == ONNXRUNTIME
                else "graft runs OpenVINO on the CPU only"
            )
        )
    return setting


def _runs_on(runtime: str, device: Device) -> bool:
    """Whether `runtime` can run a network on `device` (TensorFlow: checked when it starts)."""
    if device.kind != GPU or runtime == TENSORFLOW:
        return True
    if runtime == ONNXRUNTIME:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return False


def default_threads(batch_threads: int, cgroup: Path = CGROUP) -> int:
    """Threads per network call so that `batch_threads` concurrent batches share the cores
    this process may use (a container's CPU limit included) instead of oversubscribing them."""
    return max(1, usable_cores(cgroup) // batch_threads)


def open_network(runtime: str, path: Path, threads: int, device: Device = Device()) -> Network:
    """The network in `path` (ONNX) on `runtime`: RuntimeUnavailable if the runtime cannot
    start here, RejectedModel if it cannot run this file."""
    networks = {ONNXRUNTIME: OnnxRuntimeNetwork, OPENVINO: OpenVinoNetwork}
    if runtime not in networks:
        raise RuntimeUnavailable(f"{runtime!r} is not an accelerated runtime")
    try:
        module = importlib.import_module(runtime)
    except Exception as exc:  # a broken install raises more than ImportError
        raise RuntimeUnavailable(f"{runtime} does not import: {_first_line(exc)}") from exc
    try:
        return networks[runtime](module, path, threads, device)
    except Exception as exc:  # each runtime raises its own types for a file it cannot run
        raise RejectedModel(f"{runtime} cannot load {path.name}: {_first_line(exc)}") from exc


class OnnxRuntimeNetwork:
    runtime = ONNXRUNTIME

    def __init__(self, ort: Any, path: Path, threads: int, device: Device) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads burn the cores the other batches and the decoder need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.kind == GPU:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index}))
        self._session = ort.InferenceSession(str(path), options, providers=providers)
        self.output_names = tuple(output.name for output in self._session.get_outputs())
        self._output = _main_output(list(self.output_names))

    def run(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self._session.run([self._output], {ONNX_INPUT: pixels})[0], np.float32)

    def outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        values = self._session.run(list(self.output_names), {ONNX_INPUT: pixels})
        return {
            name: np.asarray(value) for name, value in zip(self.output_names, values, strict=True)
        }


class OpenVinoNetwork:
    runtime = OPENVINO

    def __init__(self, ov: Any, path: Path, threads: int, device: Device) -> None:
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            # On a CPU with AVX-512 BF16 or AMX, OpenVINO computes in bfloat16 unless told
            # otherwise: 6e-4 from the SavedModel's probabilities, past the 1e-4 load check.
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self._compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.output_names = tuple(port.get_any_name() for port in self._compiled.outputs)
        self._output = self.output_names.index(_main_output(list(self.output_names)))

    def run(self, pixels: np.ndarray) -> np.ndarray:
        request = self._compiled.create_infer_request()  # one per call: batches run concurrently
        return np.asarray(request.infer({ONNX_INPUT: pixels})[self._output], np.float32)

    def outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        result = self._compiled.create_infer_request().infer({ONNX_INPUT: pixels})
        return {name: np.asarray(result[i]) for i, name in enumerate(self.output_names)}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
