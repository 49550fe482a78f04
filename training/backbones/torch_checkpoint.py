"""Read a PyTorch checkpoint in the legacy (pre-zip, torch < 1.6) format without importing torch.

The format is five things back to back in one file:

1. a pickle of the magic number, 2. a pickle of the protocol version (1001), 3. a pickle of
   system information (endianness, type sizes),
4. the main pickle: a state dict whose tensors are `torch._utils._rebuild_tensor_v2(storage,
   offset, size, stride, ...)` calls, each storage a *persistent id*
   `("storage", torch.FloatStorage, key, location, numel, None)`,
5. a pickle of the storage keys, then for each key in that order the storage's raw bytes:
   an 8-byte little-endian element count followed by the elements.

Unpickling runs whatever callables a pickle names, so the unpickler here resolves only a
whitelist (OrderedDict, the tensor rebuild function, storage type names) to harmless local
objects and refuses every other global with `CheckpointError`: nothing from the file is
ever imported or executed.
"""

import collections
import math
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class CheckpointError(ValueError):
    """The file is not a legacy PyTorch state dict that this reader can load safely."""


@dataclass(frozen=True)
class _StorageType:
    """Stands in for `torch.FloatStorage` & co.: just the dtype, not callable."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _is_int_tuple(value: object) -> bool:
    return isinstance(value, tuple) and all(type(v) is int and v >= 0 for v in value)


def _rebuild_tensor(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> _TensorRef:
    """Our replacement for torch._utils._rebuild_tensor_v2: records where the data lives."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointError("a tensor's storage is not a storage reference")
    if type(storage_offset) is not int or storage_offset < 0:
        raise CheckpointError(f"bad storage offset {storage_offset!r}")
    if not (_is_int_tuple(size) and _is_int_tuple(stride) and len(size) == len(stride)):
        raise CheckpointError(f"bad tensor size/stride {size!r} / {stride!r}")
    if backward_hooks:
        raise CheckpointError("tensors with backward hooks are not supported")
    return _TensorRef(storage, storage_offset, size, stride)  # type: ignore[arg-type]


class _RefusingUnpickler(pickle.Unpickler):
    """Resolves no globals at all: for the header pickles and the storage key list."""

    def find_class(self, module: str, name: str) -> Any:
        raise CheckpointError(
            f"refusing to load {module}.{name} from the checkpoint: only tensors and plain "
            "containers are allowed, and loading it could run arbitrary code"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"unexpected persistent id {pid!r} outside the state dict")


class _StateDictUnpickler(_RefusingUnpickler):
    """Allows OrderedDict, tensor rebuilds and storage type names; refuses everything else."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, np.dtype(_STORAGE_DTYPES[name]))
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise CheckpointError(f"bad storage reference {pid!r}")
        if type(numel) is not int or numel < 0 or view is not None:
            raise CheckpointError(f"unsupported storage {key!r} (size {numel!r}, view {view!r})")
        ref = _StorageRef(key, storage_type.dtype, numel)
        if self.storages.setdefault(key, ref) != ref:
            raise CheckpointError(f"storage {key!r} is declared twice with different types")
        return ref


def _load_pickle(unpickler: pickle.Unpickler, what: str) -> Any:
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except Exception as exc:  # a malformed pickle can raise almost anything
        raise CheckpointError(f"cannot read the {what}: {exc}") from exc


def _check_header(f: BinaryIO) -> None:
    if f.read(4) == b"PK\x03\x04":
        raise CheckpointError(
            "this is a zip-format checkpoint (torch >= 1.6); only the legacy format is supported"
        )
    f.seek(0)
    if _load_pickle(_RefusingUnpickler(f), "magic number") != LEGACY_MAGIC:
        raise CheckpointError("not a legacy PyTorch checkpoint (wrong magic number)")
    if _load_pickle(_RefusingUnpickler(f), "protocol version") != PROTOCOL_VERSION:
        raise CheckpointError("unsupported PyTorch serialization protocol version")
    sys_info = _load_pickle(_RefusingUnpickler(f), "system info")
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise CheckpointError("only little-endian checkpoints are supported")


def _read_storages(
    f: BinaryIO, declared: Mapping[str, _StorageRef], file_size: int
) -> dict[str, np.ndarray]:
    keys = _load_pickle(_RefusingUnpickler(f), "storage key list")
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise CheckpointError("the storage key list is not a list of strings")
    if sorted(keys) != sorted(declared):
        raise CheckpointError("the storage key list does not match the tensors in the state dict")
    data: dict[str, np.ndarray] = {}
    for key in keys:
        ref = declared[key]
        (count,) = struct.unpack("<q", f.read(8).ljust(8, b"\0"))
        nbytes = count * ref.dtype.itemsize
        if count != ref.numel or nbytes > file_size - f.tell():
            raise CheckpointError(f"storage {key!r} is truncated or has the wrong size")
        data[key] = np.frombuffer(f.read(nbytes), dtype=ref.dtype)
    if f.read(1):
        raise CheckpointError("unexpected bytes after the last storage")
    return data


def _materialise(ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
    # Tensors may be strided views (e.g. channels-last kernels): check the extent, then copy.
    # Zero strides could make a tiny storage "hold" an enormous tensor, so a tensor may not
    # have more elements than its storage.
    if math.prod(ref.size) > storage.size:
        raise CheckpointError(f"a tensor is larger than its storage {ref.storage.key!r}")
    extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if 0 not in ref.size and extent >= storage.size:
        raise CheckpointError(f"a tensor reads past the end of storage {ref.storage.key!r}")
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :] if storage.size else storage,
        shape=ref.size,
        strides=tuple(s * storage.itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view, dtype=storage.dtype.newbyteorder("="))


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A legacy-format PyTorch state dict file -> {tensor name: numpy array}."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        _check_header(f)
        unpickler = _StateDictUnpickler(f)
        state = _load_pickle(unpickler, "state dict")
        if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, _TensorRef) for k, v in state.items()
        ):
            raise CheckpointError("the checkpoint is not a flat state dict of named tensors")
        storages = _read_storages(f, unpickler.storages, size)
    return {name: _materialise(ref, storages[ref.storage.key]) for name, ref in state.items()}
