"""What a version folder holds: the names every side (export, store, runtime, protocols) shares.

A version is a TensorFlow SavedModel with graft's manifest beside it:
    saved_model.pb  fingerprint.pb  graft.json  assets/labels.txt  variables/...
and, when exported with one, the accelerated network beside it: onnx/model.onnx.
"""

MANIFEST_FILE = "graft.json"
LABELS_FILE = "assets/labels.txt"
SAVED_MODEL_FILE = "saved_model.pb"
VARIABLES_INDEX_FILE = "variables/variables.index"

SERVING_SIGNATURE = "serving_default"  # `images`: encoded images, tf.string [n]
PIXELS_SIGNATURE = "serve_pixels"  # `pixels`: uint8 [n, h, w, 3]
SIGNATURES = (SERVING_SIGNATURE, PIXELS_SIGNATURE)
# Signature -> the one input tensor it takes.
SIGNATURE_INPUTS = {SERVING_SIGNATURE: "images", PIXELS_SIGNATURE: "pixels"}
OUTPUTS = ("probabilities", "label", "score")
# Versions trained with the out-of-distribution flag also output, in both signatures (and their
# ONNX network): `ood_score` float32 [n] (higher = further from the training images) and
# `in_distribution` bool [n] (ood_score <= the threshold in graft.json's `ood`).
OOD_SCORE_OUTPUT = "ood_score"
OOD_FLAG_OUTPUT = "in_distribution"
OOD_OUTPUTS = (OOD_SCORE_OUTPUT, OOD_FLAG_OUTPUT)

# `images` (tf.string [n]) -> `pixels`: float32 [n, s, s, 3] in [0, 255], decoded and resized by
# the one function training uses; an accelerated runtime runs the network on its output.
PREPROCESS_SIGNATURE = "preprocess"
# `images` (tf.string [n]) -> serving_default's outputs (`probabilities` [n, C], ..., the OOD
# outputs where the version has them) and `heatmap`: float32 [n, s, s] in [0, 1], the Grad-CAM
# of the top-1 class on the backbone's last convolutional block (training.gradcam), computed in
# the same pass. Exports made before it lack it: they classify, and explaining them is refused.
EXPLAIN_SIGNATURE = "explain"
EXPLAIN_OUTPUTS = ("probabilities", "heatmap")
# The network alone (float32 pixels [n, s, s, 3] in [0, 255] -> probabilities [n, C]) as ONNX.
ONNX_FILE = "onnx/model.onnx"
ONNX_INPUT = "pixels"
ONNX_OUTPUT = "probabilities"
