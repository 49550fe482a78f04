"""The tutorial approach: a FastAPI app that calls the model once per request.

Kept honest: the same SavedModel, its own `serving_default` (so the same decode and resize
graft uses), loaded once at start-up, and a plain `def` endpoint that FastAPI runs in its
thread pool, so concurrent requests overlap (TensorFlow releases the GIL). What it lacks is
what graft adds: batching requests together.

Run: MODEL_DIR=models/imagenet/1 uvicorn bench.peers.tutorial_app:app --port 8001
"""

import os
from contextlib import asynccontextmanager

import tensorflow as tf
from fastapi import FastAPI, File, HTTPException, UploadFile

_model: dict[str, object] = {}


@asynccontextmanager
async def lifespan(app: FastAPI):
    loaded = tf.saved_model.load(os.environ["MODEL_DIR"])
    _model["loaded"] = loaded  # the signature function needs its object kept alive
    _model["fn"] = loaded.signatures["serving_default"]
    yield
    _model.clear()


app = FastAPI(title="tutorial classifier", lifespan=lifespan)


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/predict")
def predict(file: UploadFile = File(...), top_k: int = 5) -> dict[str, object]:
    data = file.file.read()
    try:
        outputs = _model["fn"](images=tf.constant([data]))
    except tf.errors.InvalidArgumentError as exc:
        raise HTTPException(status_code=400, detail="not a decodable image") from exc
    probabilities = outputs["probabilities"].numpy()[0]
    best = probabilities.argsort()[::-1][:top_k]
    labels = _labels()
    return {
        "label": outputs["label"].numpy()[0].decode(),
        "score": float(outputs["score"].numpy()[0]),
        "top_k": [{"label": labels[i], "score": float(probabilities[i])} for i in best],
    }


def _labels() -> list[str]:
    if "labels" not in _model:
        path = os.path.join(os.environ["MODEL_DIR"], "assets", "labels.txt")
        with open(path, encoding="utf-8") as f:
            _model["labels"] = f.read().splitlines()
    return _model["labels"]
