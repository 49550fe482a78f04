"""The checked-in gRPC stubs are what `make proto` generates from proto/ today."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def test_generated_grpc_module_imports_as_a_package() -> None:
    from service.grpc_stubs.graft.v1 import classifier_pb2, classifier_pb2_grpc

    service = classifier_pb2.DESCRIPTOR.services_by_name["ImageClassifier"]
    assert service.full_name == "graft.v1.ImageClassifier"
    assert {m.name for m in service.methods} == {"Classify", "ClassifyStream"}
    assert hasattr(classifier_pb2_grpc, "ImageClassifierServicer")
