"""KServe's Python ModelServer wrapping the same SavedModel, V1 protocol.

Runs in bench/.venv-kserve (bench/peers/setup_kserve.sh), not graft's venv: kserve pins
psutil<6 and its own fastapi/protobuf ranges. The model is given KServe's best documented
shape for CPU-bound work: `async def predict` handing the TensorFlow call to the server's
thread pool (`max_asyncio_workers`), so concurrent requests overlap instead of blocking the
event loop. Like graft and the tutorial app it calls `serving_default` on the encoded bytes.

Run: bench/.venv-kserve/bin/python -m bench.peers.kserve_model --model_dir DIR --model_name NAME
     --http_port 8002
"""

import argparse
import asyncio
import base64
from pathlib import Path

import kserve
import numpy as np
import tensorflow as tf


class SavedModelClassifier(kserve.Model):
    def __init__(self, name: str, model_dir: Path) -> None:
        super().__init__(name)
        self._model_dir = model_dir
        self._fn = None
        self._labels: list[str] = []

    def load(self) -> bool:
        self._loaded = tf.saved_model.load(str(self._model_dir))
        self._fn = self._loaded.signatures["serving_default"]
        self._labels = (self._model_dir / "assets" / "labels.txt").read_text().splitlines()
        self.ready = True
        return self.ready

    def _infer(self, images: list[bytes]) -> dict:
        outputs = self._fn(images=tf.constant(images))
        probabilities = outputs["probabilities"].numpy()
        predictions = []
        for row in probabilities:
            best = np.argsort(row)[::-1][:5]
            predictions.append(
                {
                    "label": self._labels[int(best[0])],
                    "score": float(row[best[0]]),
                    "top_k": [
                        {"label": self._labels[int(i)], "score": float(row[i])} for i in best
                    ],
                }
            )
        return {"predictions": predictions}

    async def predict(self, payload: dict, headers: dict[str, str] | None = None) -> dict:
        images = [base64.b64decode(instance["b64"]) for instance in payload["instances"]]
        return await asyncio.get_running_loop().run_in_executor(None, self._infer, images)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_dir", type=Path, required=True)
    args, _ = parser.parse_known_args()
    model = SavedModelClassifier(args.model_name, args.model_dir)
    model.load()
    kserve.ModelServer(http_port=args.http_port, enable_grpc=False).start([model])
