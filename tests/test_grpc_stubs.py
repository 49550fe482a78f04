"""The checked-in gRPC stubs are what `make proto` generates from proto/ today."""

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto/generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_stubs_are_current(tmp_path: Path) -> None:
    generator = _generator()
    fresh = generator.generate(tmp_path)
    assert fresh, "the generator produced no files"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        checked_in = REPO / relative
        assert checked_in.exists(), f"{relative} is missing: run `make proto` and commit it"
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"{relative} is stale: run `make proto` and commit the result"
        )


def test_generated_grpc_module_imports_as_a_package() -> None:
    from service.grpc_stubs.graft.v1 import classifier_pb2, classifier_pb2_grpc

    service = classifier_pb2.DESCRIPTOR.services_by_name["ImageClassifier"]
    assert service.full_name == "graft.v1.ImageClassifier"
    assert {m.name for m in service.methods} == {"Classify", "ClassifyStream"}
    assert hasattr(classifier_pb2_grpc, "ImageClassifierServicer")
