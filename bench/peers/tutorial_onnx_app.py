"""The tutorial app on the accelerated artefact: the same FastAPI app, one model call per
request, but the network is the version's `onnx/model.onnx` run by ONNX Runtime.

What a user who read both projects' documentation would write, and the best per-request
server they could:
- decode + resize with the SavedModel's own `preprocess` signature (the function training
  used, and the one graft runs before the network), so every server sees the same pixels;
- one `InferenceSession`, shared by the requests FastAPI runs at once in its thread pool
  (`run` is thread-safe and releases the GIL);
- ONNX Runtime's documented CPU settings for concurrent callers: all graph optimisations,
  sequential execution, intra-op threads = the cores this process may use, and no spinning,
  since the decode of the next request needs those cores (the session options graft uses,
  so the comparison is about serving, not tuning). TUTORIAL_ORT_THREADS sets another count.

Run: MODEL_DIR=models/imagenet/1 uvicorn bench.peers.tutorial_onnx_app:app --port 8001
"""

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tensorflow as tf

from bench.peers.tutorial_app import BadImage, create_app


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def threads() -> int:
    return int(os.environ.get("TUTORIAL_ORT_THREADS") or len(os.sched_getaffinity(0)))


class OnnxClassifier:
    """`preprocess` (TensorFlow: encoded bytes -> float32 pixels) then the ONNX network."""

    def __init__(self, model_dir: Path) -> None:
        self._loaded = tf.saved_model.load(str(model_dir))  # the signature needs it alive
        self._preprocess = self._loaded.signatures["preprocess"]
        self._session = ort.InferenceSession(
            str(model_dir / "onnx" / "model.onnx"),
            session_options(threads()),
            providers=["CPUExecutionProvider"],
        )
        self._input = self._session.get_inputs()[0].name

    def __call__(self, data: bytes) -> np.ndarray:
        try:
            pixels = self._preprocess(images=tf.constant([data]))["pixels"].numpy()
        except tf.errors.InvalidArgumentError as exc:
            raise BadImage("not a decodable image") from exc
        return self._session.run(None, {self._input: pixels})[0][0]


app = create_app(OnnxClassifier, "tutorial classifier (ONNX Runtime)")
