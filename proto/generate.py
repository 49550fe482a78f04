"""Regenerate the checked-in protobuf/gRPC code: `make proto`, or `python proto/generate.py [OUT]`.

Everything lands in the package `service/stubs/` (under OUT, the repository root by default),
and every path written is printed, one per line:

- graft's own protos (proto/graft/...) are compiled with the proto directory mounted at the
  virtual path `service/stubs`, so they are registered as `service/stubs/graft/v1/...proto` and
  their generated imports (`from service.stubs.graft.v1 import classifier_pb2`) resolve as
  package imports without any post-processing.
- the third-party protos (proto/thirdparty/: TensorFlow Serving's PredictionService API and the
  TensorFlow protos it needs) are compiled with proto/thirdparty as the include root, so they are
  registered under their ORIGINAL file names (`tensorflow/core/framework/tensor.proto`, ...) with
  the same descriptors as the tensorflow and tensorflow-serving-api wheels' `_pb2` modules. That
  is what lets them share a process with those modules: protobuf accepts a file added twice to
  the default pool when both copies are identical, and rejects the same message registered under
  another file name. Their generated `tensorflow...` / `tensorflow_serving...` imports (and the
  module names passed to the protobuf builder) are then rewritten to `service.stubs.tensorflow...`
  so that importing them never imports TensorFlow.
- KServe's Open Inference Protocol (proto/thirdparty/kserve/grpc_predict_v2.proto, package
  `inference`) is compiled with its own folder as the include root, so it is registered as
  `grpc_predict_v2.proto`, the name KServe's Python package registers it under, and lands in
  `service/stubs/kserve/`; the generated `import grpc_predict_v2_pb2` (and the builder's module
  name) are rewritten to `service.stubs.kserve.grpc_predict_v2_pb2`.

`_pb2.py` and `_pb2.pyi` are written for every proto, `_pb2_grpc.py` for those that define a
service, and an `__init__.py` for every package folder. tests/test_grpc_stubs.py runs this into a
temporary folder and fails when the checked-in code differs.

Run it in a process of its own: grpc_tools bundles its own protobuf library, which crashes a
process that has already loaded TensorFlow's.
"""

import re
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
THIRDPARTY_ROOT = PROTO_ROOT / "thirdparty"
STUB_PACKAGE = "service/stubs"
# google/protobuf/*.proto (any, wrappers, ...), bundled with grpc_tools;
# `python -m grpc_tools.protoc` adds this include itself, protoc.main() does not.
WELL_KNOWN_PROTOS = resources.files("grpc_tools") / "_proto"
GRAFT_PROTOS = ("graft/v1/classifier.proto",)
# The third-party top-level packages that are re-rooted under service.stubs.
THIRDPARTY_PACKAGES = ("tensorflow", "tensorflow_serving")
# KServe's protos: compiled from their own folder (registered without the folder name).
KSERVE_ROOT = THIRDPARTY_ROOT / "kserve"
KSERVE_STUBS = "kserve"  # under service/stubs

STUB_PACKAGE_DOC = (
    '"""Generated gRPC/protobuf code shared by the gRPC server and the Python client.\n'
    "\n"
    "Never edit by hand: `make proto` (proto/generate.py) writes everything under this folder\n"
    "from proto/graft/ and proto/thirdparty/.\n"
    '"""\n'
)

_SERVICE = re.compile(r"^\s*service\s+\w+\s*\{", re.MULTILINE)
_PACKAGES = "|".join(THIRDPARTY_PACKAGES)
# `from tensorflow.core.framework import tensor_pb2 as ...` (in .py and .pyi files).
_FROM_IMPORT = re.compile(rf"^([ \t]*)from ({_PACKAGES})([.\s])", re.MULTILINE)
# `import tensorflow.x as y`: rewritable only with an alias (a bare one binds a different name).
_IMPORT = re.compile(rf"^([ \t]*)import ({_PACKAGES})([.\s].*)$", re.MULTILINE)
# The module name the generated code hands to protobuf's builder (it becomes `__module__`).
_BUILDER_MODULE = re.compile(rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')({_PACKAGES})\.")


def _has_service(proto: Path) -> bool:
    return bool(_SERVICE.search(proto.read_text()))


def _protoc(include: str, out: Path, protos: list[Path], outputs: tuple[str, ...]) -> None:
    args = [
        "grpc_tools.protoc",
        f"-I{include}",
        f"-I{WELL_KNOWN_PROTOS}",
        *(f"--{output}_out={out}" for output in outputs),
        *(str(proto) for proto in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def _compile(include: str, out: Path, protos: list[Path]) -> None:
    """`_pb2.py` and `_pb2.pyi` for every proto, `_pb2_grpc.py` for those with a service."""
    _protoc(include, out, protos, ("python", "pyi"))
    with_service = [proto for proto in protos if _has_service(proto)]
    if with_service:
        _protoc(include, out, with_service, ("grpc_python",))


def _generated(relative_proto: str, *, grpc: bool) -> list[str]:
    stem = relative_proto.removesuffix(".proto")
    suffixes = ("_pb2.py", "_pb2.pyi", *(("_pb2_grpc.py",) if grpc else ()))
    return [f"{stem}{suffix}" for suffix in suffixes]


def rewrite_imports(source: str) -> str:
    """Re-root generated references to the third-party packages under `service.stubs`."""
    prefix = STUB_PACKAGE.replace("/", ".")

    def bare_import(match: re.Match[str]) -> str:
        if " as " not in match.group(3):
            raise ValueError(f"cannot re-root an un-aliased import: {match.group(0).strip()!r}")
        return f"{match.group(1)}import {prefix}.{match.group(2)}{match.group(3)}"

    source = _FROM_IMPORT.sub(rf"\1from {prefix}.\2\3", source)
    source = _IMPORT.sub(bare_import, source)
    return _BUILDER_MODULE.sub(rf"\g<1>{prefix}.\2.", source)


def rewrite_toplevel(source: str, modules: list[str], package: str) -> str:
    """Re-root generated references to the top-level modules `modules` under `package`."""
    for module in modules:
        source = re.sub(
            rf"^([ \t]*)import {module} as ",
            rf"\1from {package} import {module} as ",
            source,
            flags=re.MULTILINE,
        )
        source = source.replace(
            f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{module}'",
            f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{package}.{module}'",
        )
    return source


def _kserve(stub_root: Path) -> list[Path]:
    """KServe's protos: registered under their own names, imports re-rooted under the stubs."""
    protos = sorted(KSERVE_ROOT.rglob("*.proto"))
    out = stub_root / KSERVE_STUBS
    out.mkdir(parents=True, exist_ok=True)
    _compile(str(KSERVE_ROOT), out, protos)
    relative = [proto.relative_to(KSERVE_ROOT).as_posix() for proto in protos]
    modules = [name.removesuffix(".proto").replace("/", ".") + "_pb2" for name in relative]
    package = f"{STUB_PACKAGE.replace('/', '.')}.{KSERVE_STUBS}"
    files = []
    for proto, name in zip(protos, relative, strict=True):
        for generated in _generated(name, grpc=_has_service(proto)):
            path = out / generated
            path.write_text(rewrite_toplevel(path.read_text(), modules, package))
            files.append(path)
    return files


def _write_packages(out_root: Path, files: list[Path]) -> list[Path]:
    """Write an `__init__.py` into `service/stubs/` and every folder under it that holds code."""
    stub_root = out_root / STUB_PACKAGE
    folders = {stub_root}
    for path in files:
        folder = path.parent
        while folder != stub_root:
            folders.add(folder)
            folder = folder.parent
    written = []
    for folder in sorted(folders):
        init = folder / "__init__.py"
        if folder == stub_root:
            init.write_text(STUB_PACKAGE_DOC)
        else:
            package = folder.relative_to(out_root).as_posix().replace("/", ".")
            init.write_text(f'"""Generated package `{package}`: `make proto`; never edit."""\n')
        written.append(init)
    return written


def generate(out_root: Path = REPO_ROOT) -> list[Path]:
    """Write the stubs under `out_root` (the repository root by default); return their paths."""
    stub_root = out_root / STUB_PACKAGE
    stub_root.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    # graft's own protos: registered as service/stubs/graft/..., imports already package-relative.
    graft = [PROTO_ROOT / proto for proto in GRAFT_PROTOS]
    _compile(f"{STUB_PACKAGE}={PROTO_ROOT}", out_root, graft)
    for proto in GRAFT_PROTOS:
        for name in _generated(proto, grpc=_has_service(PROTO_ROOT / proto)):
            files.append(stub_root / name)

    # Third-party protos: original file names, then their imports re-rooted under service.stubs.
    thirdparty = sorted(
        proto for proto in THIRDPARTY_ROOT.rglob("*.proto") if KSERVE_ROOT not in proto.parents
    )
    _compile(str(THIRDPARTY_ROOT), stub_root, thirdparty)
    for proto in thirdparty:
        relative = proto.relative_to(THIRDPARTY_ROOT).as_posix()
        for name in _generated(relative, grpc=_has_service(proto)):
            path = stub_root / name
            path.write_text(rewrite_imports(path.read_text()))
            files.append(path)

    files += _kserve(stub_root)
    return _write_packages(out_root, files) + files


if __name__ == "__main__":
    written = generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT)
    print("\n".join(str(path) for path in written))
