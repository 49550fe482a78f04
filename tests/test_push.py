"""service.push on real tar.gz archives of real exports: what a push may contain, and that every
refusal is a 422 naming the reason while the serving version stays untouched."""

import gzip
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.exports import make_tiny_export, raw_saved_model

from service.errors import GraftError, RejectedModel
from service.push.archive import PushLimits, extract_archive, pack_export
from service.push.checks import check_contents
from service.push.receive import receive_push
from service.runtime.graph_ops import refuse_unlisted_ops
from service.runtime.model_check import check_model
from service.settings import GraftSettings
from service.store.layout import MANIFEST_FILE
from service.store.manifest import Manifest, hash_tree
from service.store.repository import ModelRepository

LIMITS = PushLimits()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("push") / "export", ("red", "green", "blue"))


@pytest.fixture(scope="module")
def archive(export_dir: Path) -> bytes:
    return pack_export(export_dir)


@pytest.fixture
def repository(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "models")


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as out:
        for info, payload in members:
            out.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buffer.getvalue()


def regular(name: str, payload: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def export_members(export_dir: Path, prefix: str = "") -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        regular(prefix + path.relative_to(export_dir).as_posix(), path.read_bytes())
        for path in sorted(export_dir.rglob("*"))
        if path.is_file()
    ]


def push(data: bytes, repository: ModelRepository, **kwargs: object) -> int:
    options = {"name": "flowers", "repository": repository, "limits": LIMITS, **kwargs}
    return receive_push(data, **options)  # type: ignore[arg-type]


def assert_rejected(
    data: bytes, repository: ModelRepository, match: str, **kwargs: object
) -> RejectedModel:
    with pytest.raises(RejectedModel, match=match) as caught:
        push(data, repository, **kwargs)
    assert caught.value.http_status == 422
    assert repository.models() == [] or repository.versions("flowers") == [1]
    assert repository.scratch_folders() == [], "the scratch folder was not cleaned up"
    return caught.value


def rehashed_copy(export_dir: Path, target: Path, edit: Callable[[Path], None]) -> Path:
    """A copy of the export with `edit` applied and the manifest hashes recomputed, so only
    the edit itself can be what a check objects to."""
    shutil.copytree(export_dir, target)
    edit(target)
    manifest = Manifest.read(target)
    manifest.model_copy(update={"files": hash_tree(target)}).write(target)
    return target


# -- happy paths --------------------------------------------------------------------------------


def test_a_packed_export_publishes_as_the_next_version(
    archive: bytes, repository: ModelRepository
) -> None:
    assert push(archive, repository) == 1
    assert push(archive, repository) == 2
    assert repository.verify("flowers", 2).labels == ["red", "green", "blue"]
    assert repository.scratch_folders() == []


@pytest.mark.parametrize("prefix", ["./", "export/"])
def test_archives_made_with_tar_from_inside_or_above_the_folder_are_accepted(
    export_dir: Path, repository: ModelRepository, prefix: str
) -> None:
    folder = tarfile.TarInfo(prefix.rstrip("/") or ".")
    folder.type = tarfile.DIRTYPE
    data = tar_gz([(folder, None), *export_members(export_dir, prefix)])
    assert push(data, repository) == 1


def test_full_model_check_loads_and_warms_up_before_publishing(
    archive: bytes, repository: ModelRepository
) -> None:
    assert push(archive, repository, check_model=check_model) == 1


def test_limits_come_from_settings() -> None:
    limits = PushLimits.from_settings(GraftSettings(max_push_bytes=10, max_push_members=3))
    assert (limits.max_compressed_bytes, limits.max_members) == (10, 3)


# -- archive-level refusals ---------------------------------------------------------------------

ARCHIVE_ATTACKS: dict[str, tuple[list[tuple[tarfile.TarInfo, bytes | None]], str]] = {
    "absolute path": ([regular("/etc/cron.d/graft", b"* * * * * root sh")], "absolute path"),
    "dot-dot": ([regular("variables/../../escape.txt", b"x")], r"climbs out .*'\.\.'"),
    "symlink": ([special("saved_model.pb", tarfile.SYMTYPE, "/etc/passwd")], "is a link"),
    "hardlink": ([special("saved_model.pb", tarfile.LNKTYPE, "/etc/shadow")], "is a link"),
    "char device": ([special("saved_model.pb", tarfile.CHRTYPE)], "device, fifo"),
    "block device": ([special("saved_model.pb", tarfile.BLKTYPE)], "device, fifo"),
    "fifo": ([special("saved_model.pb", tarfile.FIFOTYPE)], "device, fifo"),
    "keras h5": ([regular("model.h5", b"\x89HDF\r\n\x1a\n")], r"unexpected file 'model\.h5'"),
    "keras v3": ([regular("model.keras", b"PK\x03\x04")], r"unexpected file 'model\.keras'"),
    "pickle": ([regular("variables/weights.pkl", b"\x80\x04.")], "unexpected file"),
    "extra folder": (
        [regular("graft.json", b"{}"), special("keras_metadata", tarfile.DIRTYPE)],
        "unexpected folder",
    ),
    "backslash": ([regular("assets\\labels.txt", b"a\n")], "backslash"),
    "duplicate": ([regular("graft.json", b"{}"), regular("graft.json", b"{}")], "appears twice"),
}


@pytest.mark.parametrize("case", sorted(ARCHIVE_ATTACKS))
def test_hostile_members_are_refused_before_anything_is_written(
    case: str, repository: ModelRepository
) -> None:
    members, reason = ARCHIVE_ATTACKS[case]
    assert_rejected(tar_gz(members), repository, reason)


def test_a_rejected_push_leaves_the_serving_version_untouched(
    archive: bytes, repository: ModelRepository
) -> None:
    assert push(archive, repository) == 1
    before = repository.verify("flowers", 1)
    assert_rejected(tar_gz([regular("../x", b"")]), repository, "climbs out")
    assert repository.versions("flowers") == [1]
    assert repository.verify("flowers", 1) == before


def test_member_count_is_capped(export_dir: Path, repository: ModelRepository) -> None:
    data = tar_gz(export_members(export_dir))
    assert_rejected(data, repository, "more than 4 members", limits=PushLimits(max_members=4))


def test_uncompressed_size_is_capped_while_streaming(repository: ModelRepository) -> None:
    """A gzip bomb: 64 MiB of zeros in a ~64 KiB archive stops at the 8 MiB cap."""
    bomb = tarfile.TarInfo("variables/variables.data-00000-of-00001")
    bomb.size = 64 * 1024 * 1024
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as out:
        out.addfile(bomb, _Zeros(bomb.size))
    data = buffer.getvalue()
    assert len(data) < 512 * 1024
    limits = PushLimits(max_uncompressed_bytes=8 * 1024 * 1024)
    assert_rejected(data, repository, "unpacks to more than 8 MiB", limits=limits)


def test_compressed_size_is_capped_for_bytes_and_streams(
    repository: ModelRepository, tmp_path: Path
) -> None:
    noise = __import__("os").urandom(2 * 1024 * 1024)  # incompressible
    data = tar_gz([regular("variables/variables.data-00000-of-00001", noise)])
    limits = PushLimits(max_compressed_bytes=1024 * 1024)
    assert_rejected(data, repository, "over 1 MiB", limits=limits)
    with pytest.raises(RejectedModel, match="over 1 MiB"):
        extract_archive(io.BytesIO(data), tmp_path / "streamed", limits)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"", "not a valid tar.gz"),
        (b"PK\x03\x04 a zip file", "not a valid tar.gz"),
        (b"\x80\x04\x95 a pickle", "not a valid tar.gz"),
    ],
)
def test_not_a_gzip_tar(payload: bytes, why: str, repository: ModelRepository) -> None:
    assert_rejected(payload, repository, why)


def test_plain_uncompressed_tar_is_refused(export_dir: Path, repository: ModelRepository) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as out:
        out.add(export_dir / "graft.json", arcname="graft.json")
    assert_rejected(buffer.getvalue(), repository, "not a valid tar.gz")


def test_truncated_archive(archive: bytes, repository: ModelRepository) -> None:
    assert_rejected(archive[: len(archive) // 2], repository, "not a valid tar.gz")


# -- export-level refusals ----------------------------------------------------------------------


def test_a_file_changed_after_export_fails_the_hash_check(
    export_dir: Path, repository: ModelRepository
) -> None:
    members = export_members(export_dir)
    tampered = [
        regular(info.name, payload + b"\x00" if info.name == "saved_model.pb" else payload)
        for info, payload in members
    ]
    assert_rejected(
        tar_gz(tampered), repository, r"manifest check failed.*changed: saved_model\.pb"
    )


def test_an_extra_shard_not_in_the_manifest_is_refused(
    export_dir: Path, repository: ModelRepository
) -> None:
    extra = regular("variables/variables.data-00001-of-00002", b"\x00" * 16)
    data = tar_gz([*export_members(export_dir), extra])
    assert_rejected(data, repository, "not in manifest: variables/variables.data-00001")


@pytest.mark.parametrize("missing", ["assets/labels.txt", "graft.json", "saved_model.pb"])
def test_missing_required_files(
    export_dir: Path, repository: ModelRepository, missing: str
) -> None:
    members = [m for m in export_members(export_dir) if m[0].name != missing]
    assert_rejected(tar_gz(members), repository, f"lacks {missing}")


def test_labels_file_disagreeing_with_the_manifest(
    export_dir: Path, repository: ModelRepository, tmp_path: Path
) -> None:
    def edit(folder: Path) -> None:
        (folder / "assets/labels.txt").write_text("red\ngreen\nmauve\n")

    copy = rehashed_copy(export_dir, tmp_path / "copy", edit)
    assert_rejected(pack_export(copy), repository, "labels.txt disagrees")


def test_a_keras_lambda_config_is_refused(
    export_dir: Path, repository: ModelRepository, tmp_path: Path
) -> None:
    def edit(folder: Path) -> None:
        with (folder / "saved_model.pb").open("ab") as out:
            out.write(b'{"class_name": "Lambda", "config": {"function": ["4wEAAAAA", null]}}')

    copy = rehashed_copy(export_dir, tmp_path / "copy", edit)
    assert_rejected(pack_export(copy), repository, "Keras Lambda layer")


def test_oversized_manifest_is_refused_before_parsing(export_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(export_dir, tmp_path / "copy")
    (copy / MANIFEST_FILE).write_bytes(b" " * (5 * 1024 * 1024))
    with pytest.raises(RejectedModel, match=r"graft\.json is over 4 MiB"):
        check_contents(copy)


# -- model-level refusals (TensorFlow) ----------------------------------------------------------


def _rows(images, values):  # inside a tf.function: tensors in, tensor out
    import tensorflow as tf

    return tf.tile(tf.constant([values], tf.float32), [tf.shape(images)[0], 1])


MODEL_FAULTS: dict[str, tuple[list[str], Callable, str]] = {
    "nan": (["a", "b"], lambda images: _rows(images, [float("nan"), 1.0]), "NaN"),
    "not normalised": (["a", "b"], lambda images: _rows(images, [0.9, 0.9]), "not 1"),
    "width != labels": (
        ["a", "b", "c"],
        lambda images: _rows(images, [0.5, 0.5]),
        "2 probabilities",
    ),
}


@pytest.mark.parametrize("fault", sorted(MODEL_FAULTS))
def test_model_faults_are_refused_by_the_full_check(
    fault: str, repository: ModelRepository, tmp_path: Path
) -> None:
    labels, outputs, reason = MODEL_FAULTS[fault]
    folder = raw_saved_model(tmp_path / "raw", labels, outputs)
    assert_rejected(pack_export(folder), repository, reason, check_model=check_model)


def test_a_graph_that_writes_files_is_refused(repository: ModelRepository, tmp_path: Path) -> None:
    import tensorflow as tf

    planted = tmp_path / "planted"

    def outputs(images: tf.Tensor) -> tf.Tensor:
        with tf.control_dependencies([tf.io.write_file(str(planted), images[0])]):
            return _rows(images, [0.5, 0.5])

    folder = raw_saved_model(tmp_path / "raw", ["a", "b"], outputs)
    with pytest.raises(RejectedModel, match="WriteFile"):
        refuse_unlisted_ops(folder)
    assert_rejected(pack_export(folder), repository, "WriteFile", check_model=check_model)
    assert not planted.exists(), "the hostile graph ran"


def test_a_real_export_uses_only_allowed_ops(export_dir: Path) -> None:
    refuse_unlisted_ops(export_dir)


# -- concurrency --------------------------------------------------------------------------------


def test_concurrent_pushes_get_distinct_complete_versions(
    archive: bytes, repository: ModelRepository
) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(push(archive, repository))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results) == [1, 2, 3, 4] == repository.versions("flowers")
    for version in results:
        repository.verify("flowers", version)


# -- fuzzing --------------------------------------------------------------------------------------

NAMES = st.sampled_from(
    [
        "saved_model.pb", "graft.json", "assets/labels.txt", "variables/variables.index",
        "variables/variables.data-00000-of-00001", "variables", "assets", ".", "./x", "/abs",
        "../up", "a/../../b", "export/saved_model.pb", "model.h5", "", "a\\b", "assets/\x01",
    ]
)  # fmt: skip
KINDS = st.sampled_from(
    [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]
)
FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


@FUZZ
@given(entries=st.lists(st.tuples(NAMES, KINDS, st.binary(max_size=64)), max_size=8))
def test_fuzz_arbitrary_archives_never_escape_the_target(
    entries: list[tuple[str, bytes, bytes]], tmp_path: Path
) -> None:
    members = []
    for name, kind, payload in entries:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.REGTYPE:
            info.size = len(payload)
        else:
            info.linkname = "/etc/passwd"
        members.append((info, payload if kind == tarfile.REGTYPE else None))
    scratch = Path(__import__("tempfile").mkdtemp(dir=tmp_path))
    target = scratch / "inner" / "export"
    try:
        extract_archive(io.BytesIO(tar_gz(members)), target, LIMITS)
        check_contents(target)
    except RejectedModel as error:
        assert error.message
    written = {p.relative_to(scratch).as_posix() for p in scratch.rglob("*")}
    assert all(p == "inner" or p.startswith("inner/export") for p in written), written
    assert not any(p.is_symlink() for p in scratch.rglob("*"))
    shutil.rmtree(scratch)


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=6),
)
def test_fuzz_corrupted_archives_are_only_ever_rejected(
    archive: bytes, flips: list[tuple[int, int]], tmp_path: Path
) -> None:
    data = bytearray(archive)
    for position, mask in flips:
        data[position % len(data)] ^= mask
    target = Path(__import__("tempfile").mkdtemp(dir=tmp_path)) / "export"
    try:
        extract_archive(io.BytesIO(bytes(data)), target, LIMITS)
        check_contents(target)
    except GraftError as error:
        assert isinstance(error, RejectedModel) and error.message
    shutil.rmtree(target.parent)


class _Zeros(io.RawIOBase):
    """`size` zero bytes, produced on demand (so the bomb test allocates nothing big)."""

    def __init__(self, size: int) -> None:
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self._left)
        buffer[:count] = bytes(count)
        self._left -= count
        return count


# -- tar extension headers (pax, GNU long names) ----------------------------------------------

_GiB = 1024**3
_EXTRACT_AND_MEASURE = """
import io, json, resource, sys
from pathlib import Path
limit = 4 * 1024**3  # were the header read, the host's memory is not the test's to take
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from service.errors import RejectedModel
from service.push.archive import PushLimits, extract_archive
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    with open(sys.argv[1], "rb") as stream:
        extract_archive(stream, Path(sys.argv[2]), PushLimits())
    outcome = {"ok": True}
except RejectedModel as error:
    outcome = {"status": error.http_status, "message": error.message}
except BaseException as error:
    outcome = {"error": repr(error)[:200]}
outcome["grew_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps(outcome))
"""


def _deflated(data: bytes, final: bool = False) -> bytes:
    """`data` as a self-contained raw deflate segment (a full flush resets the history), so
    segments can be concatenated, and one segment of zeros repeated, into one stream."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(
        zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH
    )


def _write_pax_bomb(path: Path, payload_size: int) -> None:
    """A tar.gz whose first header is a pax header announcing `payload_size` bytes of zeros,
    written to `path` without ever holding the payload in memory (6 GiB is ~6 MB gzipped)."""
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, payload_size
    head = pax.tobuf(format=tarfile.USTAR_FORMAT)
    tail = b"".join(
        info.tobuf(format=tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512)
        for info, payload in [regular("graft.json", b"{}")]
    ) + bytes(1024)
    chunk = 16 * 1024 * 1024
    assert payload_size % chunk == 0
    zeros = bytes(chunk)
    zeros_deflated = _deflated(zeros)
    crc = zlib.crc32(head)
    for _ in range(payload_size // chunk):
        crc = zlib.crc32(zeros, crc)
    crc = zlib.crc32(tail, crc)
    size = len(head) + payload_size + len(tail)
    with path.open("wb") as out:
        out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # gzip header, no name or time
        out.write(_deflated(head))
        for _ in range(payload_size // chunk):
            out.write(zeros_deflated)
        out.write(_deflated(tail, final=True))
        out.write(struct.pack("<II", crc, size & 0xFFFFFFFF))


def _extract_in_subprocess(archive_path: Path, target: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _EXTRACT_AND_MEASURE, str(archive_path), str(target)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_6_gib_pax_header_is_refused_without_reading_it_into_memory(tmp_path: Path) -> None:
    """tarfile reads a pax header's whole payload into memory: 6 GiB of zeros, ~6 MB gzipped,
    must be refused from its 512-byte header, with the extracting process staying small."""
    bomb = tmp_path / "pax-bomb.tar.gz"
    _write_pax_bomb(bomb, 6 * _GiB)
    assert bomb.stat().st_size < 16 * 1024 * 1024
    with gzip.open(bomb) as check:  # a well-formed gzip: the refusal is about the header
        assert tarfile.TarInfo.frombuf(check.read(512), "utf-8", "strict").size == 6 * _GiB
    outcome = _extract_in_subprocess(bomb, tmp_path / "export")
    assert outcome.get("status") == 422, outcome
    assert "pax header" in outcome["message"] and "64 KiB" in outcome["message"], outcome
    assert outcome["grew_kib"] < 64 * 1024, outcome  # peak RSS grew by under 64 MiB


def test_a_pax_header_is_refused_as_a_push(repository: ModelRepository) -> None:
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 1024 * 1024
    data = pax.tobuf(format=tarfile.USTAR_FORMAT) + b"\x00" * pax.size + bytes(1024)
    assert_rejected(gzip.compress(data), repository, r"1048576-byte tar pax header")


def _long_name_chain(count: int, member: tuple[tarfile.TarInfo, bytes]) -> bytes:
    """`count` GNU long-name headers (`././@LongLink`, type 'L') before one member."""
    blocks = []
    for index in range(count):
        name = f"variables/long-{index}".encode() + b"\x00"
        link = tarfile.TarInfo("././@LongLink")
        link.type, link.size = tarfile.GNUTYPE_LONGNAME, len(name)
        blocks.append(link.tobuf(format=tarfile.USTAR_FORMAT) + name + bytes(-len(name) % 512))
    info, payload = member
    blocks.append(info.tobuf(format=tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512))
    return gzip.compress(b"".join(blocks) + bytes(1024))


def test_chained_gnu_long_names_are_a_422_not_a_recursion_error(
    repository: ModelRepository, tmp_path: Path
) -> None:
    data = _long_name_chain(1500, regular("graft.json", b"{}"))
    assert_rejected(data, repository, r"more than 8 tar extension headers .* in a row")
    with pytest.raises(RejectedModel, match="GNU long-name header"):
        extract_archive(io.BytesIO(data), tmp_path / "streamed", LIMITS)


def test_ordinary_extension_headers_still_push(
    export_dir: Path, repository: ModelRepository
) -> None:
    """What real tars write: a pax header per member (pack_export, for float mtimes), GNU
    long names (`tar --format=gnu`), and a pax global header."""
    assert push(pack_export(export_dir), repository) == 1
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w:gz", format=tarfile.GNU_FORMAT) as out:
        for info, payload in export_members(export_dir, "./" + "e" * 120 + "/"):
            out.addfile(info, io.BytesIO(payload))
    assert push(gnu.getvalue(), repository) == 2
    pax = io.BytesIO()
    with tarfile.open(
        fileobj=pax, mode="w:gz", format=tarfile.PAX_FORMAT, pax_headers={"comment": "graft"}
    ) as out:
        for info, payload in export_members(export_dir, "export-é/"):
            info.mtime = 1.5
            out.addfile(info, io.BytesIO(payload))
    assert push(pax.getvalue(), repository) == 3


def test_an_old_gnu_sparse_member_is_refused(repository: ModelRepository) -> None:
    info = tarfile.TarInfo("variables/variables.data-00000-of-00001")
    info.type = tarfile.GNUTYPE_SPARSE
    assert_rejected(tar_gz([(info, None)]), repository, "sparse file")
