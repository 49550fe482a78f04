"""The torch-free reader of legacy PyTorch checkpoints: reads real files, refuses bad ones.

Test checkpoints are written here in the legacy format by a small writer that emits the same
pickle opcodes torch.save(..., _use_new_zipfile_serialization=False) does, without torch.
"""

import collections
import io
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest

from training.backbones import efficientnet_lite0
from training.backbones.lite0_architecture import build_efficientnet_lite0
from training.backbones.lite0_conversion import assign_checkpoint, packaged_checkpoint
from training.backbones.torch_checkpoint import (
    LEGACY_MAGIC,
    PROTOCOL_VERSION,
    CheckpointError,
    load_state_dict,
)

_STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}


class _Global:
    """A module-level name as a pickle GLOBAL, without importing the module."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self) -> None:  # pickle only reduces to callables; never called here
        raise AssertionError("a test global must never be called")


class _Call:
    """Pickled as `func(*args)` (the REDUCE opcode)."""

    def __init__(self, func: _Global, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[_Global, tuple[object, ...]]:
        return self.func, self.args


class _Storage:
    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.data = key, np.ascontiguousarray(data).reshape(-1)


class _LegacyPickler(pickle._Pickler):  # the pure-Python pickler lets us add a dispatch entry
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_raw_global(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = _save_raw_global

    def persistent_id(self, obj: object) -> tuple[object, ...] | None:
        if not isinstance(obj, _Storage):
            return None
        storage_type = _Global("torch", _STORAGE_NAMES[obj.data.dtype])
        return ("storage", storage_type, obj.key, "cpu", obj.data.size, None)


def _dumps(obj: object) -> bytes:
    buffer = io.BytesIO()
    _LegacyPickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _tensor(storage: _Storage, shape: tuple[int, ...], stride: tuple[int, ...]) -> _Call:
    rebuild = _Global("torch._utils", "_rebuild_tensor_v2")
    return _Call(rebuild, storage, 0, shape, stride, False, collections.OrderedDict())


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))


def write_legacy(path: Path, tensors: dict[str, np.ndarray], main: object = None) -> Path:
    """Write `tensors` (or any `main` object) as a legacy-format torch checkpoint."""
    storages = [_Storage(str(i), array) for i, array in enumerate(tensors.values())]
    if main is None:
        main = collections.OrderedDict(
            (name, _tensor(s, array.shape, _contiguous_strides(array.shape)))
            for (name, array), s in zip(tensors.items(), storages, strict=True)
        )
    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True, "type_sizes": {}}
    with path.open("wb") as f:
        for header in (LEGACY_MAGIC, PROTOCOL_VERSION, sys_info):
            f.write(pickle.dumps(header, protocol=2))
        f.write(_dumps(main))
        f.write(pickle.dumps([s.key for s in storages], protocol=2))
        for s in storages:
            f.write(
                struct.pack("<q", s.data.size)
                + s.data.astype(s.data.dtype.newbyteorder("<")).tobytes()
            )
    return path


@pytest.fixture(scope="module")
def real_state() -> dict[str, np.ndarray]:
    return load_state_dict(packaged_checkpoint())


@pytest.fixture(scope="module")
def blank_lite0() -> keras.Model:
    return build_efficientnet_lite0((224, 224, 3))


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(tmp_path / "cache"))
    yield tmp_path / "cache"


def test_reads_the_packaged_lite0_checkpoint(real_state: dict[str, np.ndarray]) -> None:
    assert len(real_state) == 296
    assert real_state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert real_state["_fc.weight"].shape == (1000, 1280)
    assert real_state["_fc.weight"].dtype == np.float32
    assert np.isfinite(real_state["_blocks.15._project_conv.weight"]).all()


def test_round_trip_with_strided_and_scalar_tensors(tmp_path: Path) -> None:
    kernel = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    counter = np.array(7, dtype=np.int64)
    transposed = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = write_legacy(tmp_path / "small.pth", {"kernel": kernel, "counter": counter})
    assert load_state_dict(path)["kernel"].tolist() == kernel.tolist()
    assert load_state_dict(path)["counter"] == 7
    # A non-contiguous view: the (3, 2) transpose of a (2, 3) storage, as channels-last
    # kernels in the real checkpoint are stored.
    storage = _Storage("0", transposed)
    main = {"t": _tensor(storage, (3, 2), (1, 3))}
    view = write_legacy(tmp_path / "view.pth", {"t": transposed}, main=main)
    np.testing.assert_array_equal(load_state_dict(view)["t"], transposed.T)


@pytest.mark.parametrize(
    ("module", "name"),
    [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen"), ("torch", "load")],
)
def test_refuses_a_pickle_that_calls_an_arbitrary_function(
    tmp_path: Path, module: str, name: str
) -> None:
    marker = tmp_path / "pwned"
    payload = _Call(_Global(module, name), f"touch {marker}")
    path = write_legacy(tmp_path / "evil.pth", {}, main={"x": payload})
    with pytest.raises(CheckpointError, match=rf"refusing to load {module}\.{name}"):
        load_state_dict(path)
    assert not marker.exists()


def test_refuses_a_function_hidden_inside_a_tensor(tmp_path: Path) -> None:
    offset = _Call(_Global("builtins", "getattr"), "x", "y")
    storage = _Storage("0", np.zeros(4, np.float32))
    rebuild = _Global("torch._utils", "_rebuild_tensor_v2")
    main = {"w": _Call(rebuild, storage, offset, (4,), (1,), False, collections.OrderedDict())}
    path = write_legacy(tmp_path / "hidden.pth", {"w": storage.data}, main=main)
    with pytest.raises(CheckpointError, match=r"refusing to load builtins\.getattr"):
        load_state_dict(path)


def test_rejects_files_that_are_not_legacy_checkpoints(tmp_path: Path) -> None:
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(CheckpointError, match="zip-format"):
        load_state_dict(zipped)
    other = tmp_path / "other.pth"
    other.write_bytes(pickle.dumps(12345, protocol=2))
    with pytest.raises(CheckpointError, match="wrong magic number"):
        load_state_dict(other)


def test_rejects_a_truncated_checkpoint(tmp_path: Path) -> None:
    path = write_legacy(tmp_path / "full.pth", {"w": np.ones((64, 64), np.float32)})
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(truncated)


def test_rejects_a_tensor_that_does_not_fit_its_storage(tmp_path: Path) -> None:
    storage = _Storage("0", np.zeros(4, np.float32))
    main = {"w": _tensor(storage, (2,), (4,))}
    path = write_legacy(tmp_path / "overrun.pth", {"w": storage.data}, main=main)
    with pytest.raises(CheckpointError, match="past the end"):
        load_state_dict(path)
    # Zero strides would let four floats pose as a 10^12-element tensor.
    huge = {"w": _tensor(storage, (10**6, 10**6), (0, 0))}
    path = write_legacy(tmp_path / "huge.pth", {"w": storage.data}, main=huge)
    with pytest.raises(CheckpointError, match="larger than its storage"):
        load_state_dict(path)


def _weights(model: keras.Model) -> list[np.ndarray]:
    return [w.numpy().copy() for w in model.weights]


def _assert_unchanged(model: keras.Model, before: list[np.ndarray]) -> None:
    for value, old in zip(_weights(model), before, strict=True):
        np.testing.assert_array_equal(value, old)


def test_missing_tensor_fails_and_changes_nothing(
    real_state: dict[str, np.ndarray], blank_lite0: keras.Model
) -> None:
    state = {k: v for k, v in real_state.items() if k != "_blocks.3._bn1.running_var"}
    before = _weights(blank_lite0)
    with pytest.raises(CheckpointError, match=r"missing tensors: _blocks\.3\._bn1\.running_var"):
        assign_checkpoint(blank_lite0, state)
    _assert_unchanged(blank_lite0, before)


def test_extra_tensor_fails(real_state: dict[str, np.ndarray], blank_lite0: keras.Model) -> None:
    state = {**real_state, "_blocks.3._se_reduce.weight": np.zeros((4, 96, 1, 1), np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected tensors: _blocks\.3\._se_reduce"):
        assign_checkpoint(blank_lite0, state)


def test_wrong_shape_fails_and_changes_nothing(
    real_state: dict[str, np.ndarray], blank_lite0: keras.Model
) -> None:
    state = {**real_state, "_blocks.5._depthwise_conv.weight": np.zeros((144, 1, 3, 3), "f4")}
    before = _weights(blank_lite0)
    with pytest.raises(
        CheckpointError, match=r"_blocks\.5\._depthwise_conv\.weight.*block4a_dwconv"
    ):
        assign_checkpoint(blank_lite0, state)
    _assert_unchanged(blank_lite0, before)


def test_building_from_a_broken_checkpoint_file_fails_loudly(
    real_state: dict[str, np.ndarray], tmp_path: Path, isolated_cache: Path
) -> None:
    state = {k: v for k, v in real_state.items() if k != "_fc.bias"}
    path = write_legacy(tmp_path / "broken.pth", state)
    with pytest.raises(CheckpointError, match=r"missing tensors: _fc\.bias"):
        efficientnet_lite0(weights=path)
    assert not list(isolated_cache.glob("*.weights.h5")), "a failed conversion must not be cached"


def test_a_rewritten_checkpoint_file_converts_like_the_original(
    real_state: dict[str, np.ndarray], tmp_path: Path, isolated_cache: Path
) -> None:
    path = write_legacy(tmp_path / "copy.pth", real_state)
    model = efficientnet_lite0(weights=path)
    np.testing.assert_array_equal(
        model.get_layer("predictions").kernel.numpy(), real_state["_fc.weight"].T
    )
    assert len(list(isolated_cache.glob("efficientnet_lite0-*.weights.h5"))) == 1
