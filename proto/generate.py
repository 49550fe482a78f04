"""Regenerate graft's checked-in gRPC stubs: `make proto`, or `python proto/generate.py [OUT]`.

The proto directory is mounted at the virtual path `service/grpc_stubs`, so protoc writes
`service/grpc_stubs/graft/v1/classifier_pb2*.py` whose generated imports
(`from service.grpc_stubs.graft.v1 import classifier_pb2`) resolve as a package import
without any post-processing. tests/test_grpc_stubs.py runs this into a temporary folder and
fails when the checked-in stubs differ.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
STUB_PACKAGE = "service/grpc_stubs"
PROTOS = ("graft/v1/classifier.proto",)
GENERATED = tuple(
    f"{STUB_PACKAGE}/{proto.removesuffix('.proto')}{suffix}"
    for proto in PROTOS
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)


def generate(out_root: Path = REPO_ROOT) -> list[Path]:
    """Write the stubs under `out_root` (the repository root by default); return their paths."""
    out = str(out_root)
    args = [
        "grpc_tools.protoc",
        f"-I{STUB_PACKAGE}={PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(PROTO_ROOT / proto) for proto in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return [out_root / path for path in GENERATED]


if __name__ == "__main__":
    written = generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT)
    print("\n".join(str(path) for path in written))
