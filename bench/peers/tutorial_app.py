"""The tutorial approach: a FastAPI app that calls the model once per request.

Kept honest: the same SavedModel, its own `serving_default` (so the same decode and resize
graft uses), loaded once at start-up, and a plain `def` endpoint that FastAPI runs in its
thread pool, so concurrent requests overlap (TensorFlow releases the GIL). What it lacks is
what graft adds: batching requests together.

`create_app` is the app around any per-request classifier; bench/peers/tutorial_onnx_app.py
gives it the same version's ONNX network instead.

Run: MODEL_DIR=models/imagenet/1 uvicorn bench.peers.tutorial_app:app --port 8001
"""

import os
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import tensorflow as tf
from fastapi import FastAPI, File, HTTPException, UploadFile

# One encoded image -> its probabilities [C]; raises BadImage when it cannot be decoded.
Classify = Callable[[bytes], np.ndarray]


class BadImage(ValueError):
    pass


class SavedModelClassifier:
    """The SavedModel's `serving_default`: decode and network in one TensorFlow call."""

    def __init__(self, model_dir: Path) -> None:
        self._loaded = tf.saved_model.load(str(model_dir))  # the signature needs it alive
        self._serve = self._loaded.signatures["serving_default"]

    def __call__(self, data: bytes) -> np.ndarray:
        try:
            outputs = self._serve(images=tf.constant([data]))
        except tf.errors.InvalidArgumentError as exc:
            raise BadImage("not a decodable image") from exc
        return outputs["probabilities"].numpy()[0]


def create_app(load: Callable[[Path], Classify], title: str) -> FastAPI:
    """POST /predict (multipart field `file`, ?top_k=5) and GET /healthz around `load`'s
    classifier, loaded once at start-up from MODEL_DIR."""
    state: dict[str, object] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model_dir = Path(os.environ["MODEL_DIR"])
        state["classify"] = load(model_dir)
        state["labels"] = (model_dir / "assets" / "labels.txt").read_text("utf-8").splitlines()
        yield
        state.clear()

    app = FastAPI(title=title, lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(file: UploadFile = File(...), top_k: int = 5) -> dict[str, object]:
        try:
            probabilities = state["classify"](file.file.read())  # type: ignore[operator]
        except BadImage as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        labels: list[str] = state["labels"]  # type: ignore[assignment]
        best = probabilities.argsort()[::-1][:top_k]
        return {
            "label": labels[int(best[0])],
            "score": float(probabilities[best[0]]),
            "top_k": [{"label": labels[i], "score": float(probabilities[i])} for i in best],
        }

    return app


app = create_app(SavedModelClassifier, "tutorial classifier")
