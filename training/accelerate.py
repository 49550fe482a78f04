"""`graft export-onnx`: give a version exported without the accelerated file one, as a new version.

Older exports hold the network only inside their SavedModel's signatures, where it follows the
resize. The frozen `serve_pixels` graph is cut at the resize's output (the clip to [0, 255]
that ends `training.preprocess.resize_pixels`), and the part after it, the network, is
converted to ONNX. The new SavedModel keeps the old signatures as they are and adds
`preprocess`, the training decode + resize. Before anything is published, the new version's
accelerated path must give the old version's numbers on test images.

The new version is the same network, so it inherits the old one's promotion record (state,
figures, who decided): a rejected or candidate version's copy is not served by default either,
and a version without a record gives a copy without one (promoted).
"""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from service.runtime.loaded_model import AGREEMENT_TOLERANCE
from service.runtime.networks import ONNXRUNTIME, default_threads, open_network
from service.store.layout import (
    LABELS_FILE,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    OOD_OUTPUTS,
    PIXELS_SIGNATURE,
    PREPROCESS_SIGNATURE,
    SERVING_SIGNATURE,
)
from service.store.manifest import Accelerated, hash_tree, sha256_file
from service.store.promotion import publish_candidate, read_promotions
from service.store.repository import ModelRepository
from service.wire import Promotion
from training.onnx_export import ONNX_OPSET
from training.preprocess import decode_batch

# The op that ends resize_pixels: its output is what the network takes.
_RESIZE_END = "clip_by_value"


class CannotAccelerate(ValueError):
    """The version cannot be given an accelerated file (already has one, or an unknown graph)."""


def export_onnx(repository: ModelRepository, name: str, version: int) -> int:
    """Publish `name`/`version` plus its network as ONNX as the next version, with the old
    version's promotion record; returns it."""
    manifest = repository.verify(name, version)
    if manifest.accelerated is not None:
        raise CannotAccelerate(f"{name} v{version} already has {ONNX_FILE}; serve it as it is")
    source = repository.version_dir(name, version)
    module = tf.saved_model.load(str(source))
    with tempfile.TemporaryDirectory(prefix="graft-onnx-") as scratch:
        export = Path(scratch) / "export"
        _write_saved_model(module, export, manifest.image_size)
        (export / LABELS_FILE).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / LABELS_FILE, export / LABELS_FILE)
        accelerated = _write_network(module, export / ONNX_FILE)
        _check_agreement(export, module, manifest.image_size)
        draft = manifest.model_copy(
            update={
                "name": None,
                "version": None,
                "signatures": [*manifest.signatures, PREPROCESS_SIGNATURE],
                "accelerated": accelerated,
                "files": hash_tree(export),
            }
        )
        draft.write(export)
        records = read_promotions(repository, name)
        if version not in records:  # published before the gate: promoted, and so is its copy
            return repository.publish(export, name)
        return publish_candidate(repository, export, name, _inherited(records[version], version))


def _inherited(record: Promotion, version: int) -> Promotion:
    """`version`'s record for its copy with the ONNX file: the same decision and figures."""
    suffix = f" (inherited from v{version}, the same network, by graft export-onnx)"
    reason = record.reason[: 2000 - len(suffix)] + suffix
    return record.model_copy(update={"reason": reason})


def _write_saved_model(module: tf.Module, path: Path, image_size: int) -> None:
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def preprocess(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"pixels": decode_batch(images, image_size)}

    root = tf.Module()
    root.restored = module  # keeps the variables the old signatures read
    signatures = {key: module.signatures[key] for key in (SERVING_SIGNATURE, PIXELS_SIGNATURE)}
    signatures[PREPROCESS_SIGNATURE] = preprocess
    tf.saved_model.save(root, str(path), signatures=signatures)


def _write_network(module: tf.Module, path: Path) -> Accelerated:
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    serve_pixels = module.signatures[PIXELS_SIGNATURE]
    frozen = convert_variables_to_constants_v2(serve_pixels)
    graph = frozen.graph.as_graph_def()
    cuts = [node.name for node in graph.node if node.name.split("/")[-1] == _RESIZE_END]
    if len(cuts) != 1:
        raise CannotAccelerate(
            f"the {PIXELS_SIGNATURE} graph does not end its resize in one {_RESIZE_END!r} op "
            f"(found {len(cuts)}); re-train or re-export it with this version of graft"
        )
    outputs = dict(zip(sorted(serve_pixels.structured_outputs), frozen.outputs, strict=True))
    # The out-of-distribution outputs too, where the version has them (the runtime needs all)
    names = [ONNX_OUTPUT, *(key for key in OOD_OUTPUTS if key in outputs)]
    proto, _ = tf2onnx.convert.from_graph_def(
        graph,
        input_names=[f"{cuts[0]}:0"],
        output_names=[outputs[name].name for name in names],
        opset=ONNX_OPSET,
    )
    _rename(proto, f"{cuts[0]}:0", ONNX_INPUT)
    for name in names:
        _rename(proto, outputs[name].name, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return Accelerated(
        sha256=sha256_file(path), converter=f"tf2onnx {tf2onnx.__version__}", opset=ONNX_OPSET
    )


def _rename(proto: object, old: str, new: str) -> None:
    """Rename graph tensor `old` to `new` everywhere (inputs, outputs, node edges)."""
    graph = proto.graph  # type: ignore[attr-defined]
    for value in [*graph.input, *graph.output]:
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def _check_agreement(export: Path, old: tf.Module, image_size: int) -> None:
    """The new version's accelerated path must give the old version's probabilities."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, image_size + 7, image_size + 3, 3), np.uint8)
    images = tf.constant([tf.io.encode_png(p).numpy() for p in pixels])
    expected = old.signatures[SERVING_SIGNATURE](images=images)[ONNX_OUTPUT].numpy()
    new = tf.saved_model.load(str(export))
    network_input = new.signatures[PREPROCESS_SIGNATURE](images=images)["pixels"].numpy()
    network = open_network(ONNXRUNTIME, export / ONNX_FILE, default_threads(1))
    difference = float(np.abs(network.run(network_input) - expected).max())
    if difference > AGREEMENT_TOLERANCE:
        raise CannotAccelerate(
            f"the converted network disagrees with the version (max |difference| "
            f"{difference:.2g} > {AGREEMENT_TOLERANCE:g}); keep serving it on TensorFlow"
        )
