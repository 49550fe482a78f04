"""The checked-in stubs under service/stubs/ are what `make proto` generates from proto/ today,
and the TF Serving ones import no TensorFlow yet share a process with TensorFlow's own copies."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUBS = REPO / "service/stubs"

# The TF Serving API the gRPC server speaks, as `module_pb2` names under the original packages.
SERVING_APIS = ("prediction_service", "predict", "classification", "get_model_metadata")


def _generate(out_root: Path) -> list[Path]:
    # A child process: grpc_tools bundles its own protobuf C++ library, which crashes the
    # process once TensorFlow's copy is loaded (other test modules import TensorFlow).
    done = subprocess.run(
        [sys.executable, str(REPO / "proto/generate.py"), str(out_root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"proto/generate.py failed:\n{done.stdout}\n{done.stderr}"
    return [Path(line) for line in done.stdout.splitlines() if line]


def _python(code: str) -> dict:
    """Run `code` in a fresh interpreter from the repository root; return the JSON it prints last.

    Fresh, because what is being tested is what an import does to a process: which modules it
    loads, and what protobuf's default descriptor pool accepts.
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"child interpreter failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.splitlines()[-1])


def test_checked_in_stubs_are_current(tmp_path: Path) -> None:
    fresh = _generate(tmp_path)
    assert fresh, "the generator produced no files"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        checked_in = REPO / relative
        assert checked_in.exists(), f"{relative} is missing: run `make proto` and commit it"
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"{relative} is stale: run `make proto` and commit the result"
        )
    # ...and nothing under service/stubs/ is left over from a proto that is gone.
    generated = {path.relative_to(tmp_path) for path in fresh}
    checked_in = {
        path.relative_to(REPO)
        for path in STUBS.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert checked_in <= generated, f"not written by `make proto`: {sorted(checked_in - generated)}"


def test_generated_grpc_module_imports_as_a_package() -> None:
    # A child process: until every import moves to service.stubs, a process may also hold the
    # old service.grpc_stubs copy, whose graft.v1 messages protobuf refuses to register twice.
    found = _python(
        """
        import json
        from service.stubs.graft.v1 import classifier_pb2, classifier_pb2_grpc

        service = classifier_pb2.DESCRIPTOR.services_by_name["ImageClassifier"]
        print(json.dumps({
            "file": classifier_pb2.DESCRIPTOR.name,
            "service": service.full_name,
            "methods": sorted(m.name for m in service.methods),
            "servicer": hasattr(classifier_pb2_grpc, "ImageClassifierServicer"),
        }))
        """
    )
    assert found == {
        "file": "service/stubs/graft/v1/classifier.proto",
        "service": "graft.v1.ImageClassifier",
        "methods": ["Classify", "ClassifyStream"],
        "servicer": True,
    }


def test_tf_serving_stubs_import_no_tensorflow() -> None:
    found = _python(
        f"""
        import importlib, json, sys

        modules = [
            importlib.import_module(f"service.stubs.tensorflow_serving.apis.{{name}}_pb2")
            for name in {SERVING_APIS!r}
        ]
        grpc = importlib.import_module(
            "service.stubs.tensorflow_serving.apis.prediction_service_pb2_grpc"
        )
        service = modules[0].DESCRIPTOR.services_by_name["PredictionService"]
        print(json.dumps({{
            "loaded": sorted(
                name for name in sys.modules
                if name.split(".")[0] in ("tensorflow", "tensorflow_serving")
            ),
            "files": [module.DESCRIPTOR.name for module in modules],
            "service": service.full_name,
            "methods": sorted(m.name for m in service.methods),
            "stub": hasattr(grpc, "PredictionServiceStub"),
        }}))
        """
    )
    assert found["loaded"] == [], f"importing our stubs loaded {found['loaded']}"
    # Registered under TF Serving's own file names: what lets them coexist with its copies.
    assert found["files"] == [f"tensorflow_serving/apis/{name}.proto" for name in SERVING_APIS]
    assert found["service"] == "tensorflow.serving.PredictionService"
    methods = ["Classify", "GetModelMetadata", "MultiInference", "Predict", "Regress"]
    assert found["methods"] == methods
    assert found["stub"]


@pytest.mark.parametrize("ours_first", [True, False], ids=["ours-first", "tensorflow-first"])
def test_tf_serving_stubs_coexist_with_tensorflow(ours_first: bool) -> None:
    # Every generated third-party module and TensorFlow's copy of it, in one process: protobuf
    # raises on the second import of any file whose descriptor is not byte-identical.
    names = sorted(
        path.relative_to(STUBS).with_suffix("").as_posix().replace("/", ".")
        for top in ("tensorflow", "tensorflow_serving")
        for path in (STUBS / top).rglob("*_pb2.py")
    )
    found = _python(
        f"""
        import importlib, json

        names = {names!r}

        def ours():
            return [importlib.import_module(f"service.stubs.{{name}}") for name in names]

        def theirs():
            return [importlib.import_module(name) for name in names]

        if {ours_first!r}:
            our_modules, their_modules = ours(), theirs()
        else:
            their_modules, our_modules = theirs(), ours()

        import tensorflow as tf
        from service.stubs.tensorflow_serving.apis import predict_pb2 as our_predict
        from tensorflow_serving.apis import predict_pb2 as their_predict

        # A request built with our classes, holding a tensor TensorFlow made.
        ours_request = our_predict.PredictRequest()
        ours_request.model_spec.name = "m"
        ours_request.inputs["x"].CopyFrom(tf.make_tensor_proto([[1.0, 2.0]]))
        parsed_by_theirs = their_predict.PredictRequest.FromString(
            ours_request.SerializeToString()
        )
        # ...and one built with TensorFlow Serving's, parsed by ours.
        their_request = their_predict.PredictRequest()
        their_request.model_spec.name = "n"
        their_request.inputs["y"].CopyFrom(tf.make_tensor_proto([3], dtype=tf.int64))
        parsed_by_ours = our_predict.PredictRequest.FromString(their_request.SerializeToString())

        print(json.dumps({{
            "same_files": [
                o.DESCRIPTOR is t.DESCRIPTOR and o.DESCRIPTOR.name == t.DESCRIPTOR.name
                for o, t in zip(our_modules, their_modules)
            ],
            "same_classes": our_predict.PredictRequest is their_predict.PredictRequest,
            "theirs_read_ours": [
                parsed_by_theirs.model_spec.name,
                tf.make_ndarray(parsed_by_theirs.inputs["x"]).tolist(),
            ],
            "ours_read_theirs": [
                parsed_by_ours.model_spec.name,
                tf.make_ndarray(parsed_by_ours.inputs["y"]).tolist(),
            ],
        }}))
        """
    )
    assert len(names) == len(found["same_files"]) > 20
    differing = [n for n, ok in zip(names, found["same_files"], strict=True) if not ok]
    assert not differing, f"not the same file in the pool as TensorFlow's: {differing}"
    # upb keeps one message class per descriptor: whichever module is imported first builds it,
    # and the other module's name for it is the very same class.
    assert found["same_classes"]
    assert found["theirs_read_ours"] == ["m", [[1.0, 2.0]]]
    assert found["ours_read_theirs"] == ["n", [3]]


def test_kserve_stubs_register_under_kserves_own_file_name() -> None:
    # KServe's Python package registers grpc_predict_v2.proto under this name with the same
    # descriptor, so both can share a process (tritonclient's copy cannot: another file name).
    found = _python(
        """
        import json, sys
        from service.stubs.kserve import grpc_predict_v2_pb2 as pb
        from service.stubs.kserve import grpc_predict_v2_pb2_grpc as pb_grpc

        service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        print(json.dumps({
            "file": pb.DESCRIPTOR.name,
            "service": service.full_name,
            "methods": sorted(m.name for m in service.methods),
            "module": pb.ModelInferRequest.__module__,
            "stub": hasattr(pb_grpc, "GRPCInferenceServiceStub"),
            "raw_input_contents": pb.ModelInferRequest.DESCRIPTOR.fields_by_name[
                "raw_input_contents"
            ].number,
            "tensorflow": "tensorflow" in sys.modules,
        }))
        """
    )
    assert found == {
        "file": "grpc_predict_v2.proto",
        "service": "inference.GRPCInferenceService",
        "methods": [
            "ModelInfer", "ModelMetadata", "ModelReady", "RepositoryModelLoad",
            "RepositoryModelUnload", "ServerLive", "ServerMetadata", "ServerReady",
        ],
        "module": "service.stubs.kserve.grpc_predict_v2_pb2",
        "stub": True,
        "raw_input_contents": 7,
        "tensorflow": False,
    }  # fmt: skip
