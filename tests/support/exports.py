"""Real, tiny graft exports for tests: a small Keras model trained for a few steps on generated
images, exported with `training.export.export_model`. About 3 s on one CPU core.

    from support.exports import make_tiny_export, publish_tiny_model
    export_dir = make_tiny_export(tmp_path / "export", labels=("red", "blue"))
    version = publish_tiny_model(model_root, "flowers")   # export + publish in one call
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

TINY_IMAGE_SIZE = 32


def generated_images(count: int, classes: int, size: int, seed: int = 0) -> tuple:
    """`count` noisy images whose class decides the dominant colour channel, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % classes
    images = rng.uniform(0, 80, size=(count, size, size, 3)).astype(np.float32)
    for index, label in enumerate(labels):
        images[index, :, :, label % 3] += 150
    return images, labels


def make_tiny_model(classes: int, image_size: int = TINY_IMAGE_SIZE, steps: int = 5):
    """float32 [n, s, s, 3] pixels in [0, 255] -> softmax [n, classes], briefly trained."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((image_size, image_size, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(4, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    images, labels = generated_images(8 * steps, classes, image_size)
    model.fit(images, labels, batch_size=8, epochs=1, steps_per_epoch=steps, verbose=0)
    return model


def tiny_detector(model: object, classes: int, image_size: int = TINY_IMAGE_SIZE) -> object:
    """The out-of-distribution detector of a tiny model (training.ood, as `graft train` fits
    it): its pooled features of generated training images, thresholded on more of them."""
    import keras

    from training.ood import fit_detector

    pooled = keras.Model(model.inputs[0], model.layers[-2].output)  # the GlobalAveragePooling2D
    train, labels = generated_images(60, classes, image_size, seed=1)
    val, _ = generated_images(40, classes, image_size, seed=2)
    return fit_detector(np.asarray(pooled(train)), labels, np.asarray(pooled(val)))[0]


def make_tiny_export(
    export_dir: Path,
    labels: Sequence[str] = ("red", "green", "blue"),
    image_size: int = TINY_IMAGE_SIZE,
    metrics: dict | None = None,
    ood: bool = False,
) -> Path:
    """Train a tiny model for `labels` and export it to `export_dir` (must not exist yet);
    with `ood`, with the out-of-distribution outputs `graft train` exports."""
    from training.export import export_model

    model = make_tiny_model(len(labels), image_size)
    return export_model(
        model,
        export_dir,
        labels=list(labels),
        image_size=image_size,
        backbone="tiny-cnn",
        metrics=metrics or {"accuracy": 1.0},
        dataset_fingerprint="generated",
        ood=tiny_detector(model, len(labels), image_size) if ood else None,
    )


def publish_tiny_model(
    model_root: Path,
    name: str,
    labels: Sequence[str] = ("red", "green", "blue"),
    ood: bool = False,
) -> int:
    """Export a tiny model to a scratch folder beside `model_root` and publish it as `name`."""
    import tempfile

    from service.store.repository import ModelRepository

    with tempfile.TemporaryDirectory(dir=Path(model_root).parent) as scratch:
        export_dir = make_tiny_export(Path(scratch) / "export", labels, ood=ood)
        return ModelRepository(model_root).publish(export_dir, name)


def raw_saved_model(folder: Path, labels: list[str], outputs: Callable) -> Path:
    """A SavedModel built by hand (not through export_model, which would refuse these), with
    the labels file and a manifest, so only the model itself is wrong. `outputs(images)` maps
    the `images` string tensor to probabilities inside the signature."""
    import tensorflow as tf

    from service.store.manifest import Manifest, hash_tree

    class Module(tf.Module):
        def __init__(self) -> None:
            self.bias = tf.Variable(0.0)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
            probabilities = outputs(images) + self.bias
            return {
                "probabilities": probabilities,
                "label": tf.gather(tf.constant(labels), tf.argmax(probabilities, axis=-1)),
                "score": tf.reduce_max(probabilities, axis=-1),
            }

    module = Module()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    (folder / "assets").mkdir(exist_ok=True)
    (folder / "assets/labels.txt").write_text("".join(f"{label}\n" for label in labels))
    Manifest(backbone="raw", image_size=8, labels=labels, files=hash_tree(folder)).write(folder)
    return folder


def nan_for_large_images(images: object, threshold_bytes: int = 20_000) -> object:
    """Probabilities [0.5, 0.5], or NaN for every encoded image over `threshold_bytes`: a model
    that passes its warm-up (small images) and breaks at run time."""
    import tensorflow as tf

    large = tf.strings.length(images) > threshold_bytes
    good = tf.fill([tf.shape(images)[0], 2], 0.5)
    return tf.where(large[:, None], tf.fill(tf.shape(good), float("nan")), good)


def constant_outputs(row: Sequence[float]) -> Callable:
    """`outputs` for `raw_saved_model`: the same probabilities `row` for every image, a model
    whose answers (and mean confidence) are known exactly."""

    def outputs(images: object) -> object:
        import tensorflow as tf

        return tf.tile(tf.constant([list(row)], tf.float32), [tf.shape(images)[0], 1])

    return outputs
