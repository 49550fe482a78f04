"""The promotion gate's records: which versions may serve the requests that name no version.

A version published through the gate is a candidate until it is promoted. Its record says
what was decided, by whom, and what the gate measured (service.wire.Promotion):

    ROOT/<name>/.promotion/<version>.json

The records live beside the version folders, not inside them: a version's files are
immutable and hashed into its graft.json, while its promotion changes after publishing (an
operator promotes a candidate later). A dot name is neither a model nor a version, and TF
Serving ignores it. Version numbers are never reused, so a record left behind by a deleted
version can never apply to another one.

- No record: the version was published before the gate existed, or by something that
  publishes as before (`ModelRepository.publish`, `graft init-default`): it counts as
  promoted. `graft export-onnx` gives its copy the source version's record (or none).
- `publish_candidate` writes the candidate record under the model's lock before the version
  folder appears, so a poller never sees the new version without its record (which would
  count as promoted). The decision replaces the record later; a publisher killed in between
  leaves a candidate, which is never served unless an operator promotes or pins it.
- Records are written with `write_durably`: a reader sees the old record or the new one.
  A record graft cannot read (edited by hand) counts as a candidate, with a warning: when in
  doubt a version is not served by default.

No TensorFlow here: the poller, the CLI and the management API read these.
"""

import logging
import re
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from service.errors import ModelNotFound, ReadOnlyRepository, validation_message
from service.store.durable import fsync_dir, write_durably
from service.store.repository import ModelRepository, validate_version
from service.store.single_model import SingleVersionRepository
from service.wire import Promotion, PromotionState

PROMOTION_DIR = ".promotion"
_MAX_RECORD_BYTES = 64 * 1024  # a record is well under 2 KiB; a larger file is not ours
_RECORD_NAME = re.compile(r"^([1-9][0-9]{0,17})\.json$")

logger = logging.getLogger("graft.store")

UNRECORDED = Promotion(
    state=PromotionState.PROMOTED,
    decided_by="unrecorded",
    reason="no promotion record: published before the promotion gate, or by a command that "
    "promotes at once; it counts as promoted",
)
AWAITING_GATE = (
    "published as a candidate; the promotion gate decides next. If it stays so, the publishing "
    "command stopped before deciding: promote it (`graft promote`) or publish again"
)


def read_promotions(repository: ModelRepository, name: str) -> dict[int, Promotion]:
    """The records of `name`'s versions that have one (see `promotion_of` for the rest)."""
    folder = repository.model_dir(name) / PROMOTION_DIR
    if not folder.is_dir():
        return {}
    records = {}
    for path in folder.iterdir():
        match = _RECORD_NAME.match(path.name)
        if match:
            records[int(match.group(1))] = _read(path)
    return records


def promotion_of(records: dict[int, Promotion], version: int) -> Promotion:
    """A version's promotion: its record, else promoted (published before the gate)."""
    return records.get(version, UNRECORDED)


def promoted_versions(on_disk: list[int], records: dict[int, Promotion]) -> list[int]:
    """The versions of `on_disk` that may serve requests naming no version, ascending."""
    return [v for v in on_disk if promotion_of(records, v).state == PromotionState.PROMOTED]


def stable_version(repository: ModelRepository, name: str) -> int | None:
    """What serves `name` now when nothing names a version: the pinned version, else the
    newest promoted one (None: nothing would serve). The records are read after the versions,
    as every reader must: a version's record is written before the version appears."""
    on_disk = repository.versions(name)
    pin = repository.pin(name)
    if pin is not None:
        return pin if pin in on_disk else None
    promoted = promoted_versions(on_disk, read_promotions(repository, name))
    return promoted[-1] if promoted else None


def publish_candidate(
    repository: ModelRepository,
    export_dir: Path | str,
    name: str,
    record: Promotion | None = None,
) -> int:
    """Publish `export_dir` as the next version of `name`, recorded as a candidate (or as
    `record` says) before the version folder appears; returns the version."""
    record = record or Promotion(
        state=PromotionState.CANDIDATE, decided_by="gate", reason=AWAITING_GATE
    )

    def write_record(version: int) -> None:
        _write(repository, name, version, record)

    return repository.publish(export_dir, name, before_rename=write_record)


def record_promotion(
    repository: ModelRepository, name: str, version: int, promotion: Promotion
) -> Promotion:
    """Replace the record of an existing version (stamped now unless it says when)."""
    if validate_version(version) not in repository.versions(name):
        raise ModelNotFound(f"model {name!r} has no version {version}; list them with GET /models")
    return _write(repository, name, version, promotion)


def operator_decision(
    repository: ModelRepository,
    name: str,
    version: int,
    state: PromotionState = PromotionState.PROMOTED,
    reason: str | None = None,
) -> Promotion:
    """An operator decides `version`'s state, whatever the gate said; its figures are kept."""
    before = promotion_of(read_promotions(repository, name), version)
    was = "" if before.decided_by == "unrecorded" else f" (it was {before.state}: {before.reason})"
    promotion = Promotion(
        state=state,
        decided_by="operator",
        reason=(reason or f"{state} by an operator{was}")[:2000],
        gate=before.gate,
    )
    return record_promotion(repository, name, version, promotion)


def resolve_served(repository: ModelRepository, name: str, version: int | None = None) -> int:
    """The version a request naming `version` (None: none) gets: the explicit one, else the
    pinned one, else the newest promoted one (what the version manager serves)."""
    if version is not None or repository.pin(name) is not None:
        return repository.resolve(name, version)
    stable = stable_version(repository, name)
    if stable is None:
        repository.resolve(name)  # ModelNotFound when there are no versions at all
        raise ModelNotFound(
            f"model {name!r} has no promoted version (candidates and rejected versions serve "
            "only when pinned or named); promote one with `graft promote` or name --version"
        )
    return stable


def _write(repository: ModelRepository, name: str, version: int, record: Promotion) -> Promotion:
    if isinstance(repository, SingleVersionRepository):
        raise ReadOnlyRepository(
            f"{repository.root} holds a single version's files, served read-only and always "
            "promoted; promotion records need the <version>/ folder layout"
        )
    if record.decided_at is None:
        record = record.model_copy(update={"decided_at": datetime.now(UTC)})
    folder = repository.model_dir(name) / PROMOTION_DIR
    if not folder.is_dir():
        folder.mkdir()
        fsync_dir(folder.parent)  # else a power cut could lose the folder, and the candidates
    write_durably(folder / f"{version}.json", record.model_dump_json(indent=1).encode() + b"\n")
    return record


def _read(path: Path) -> Promotion:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_RECORD_BYTES + 1)
        if len(data) > _MAX_RECORD_BYTES:
            raise ValueError(f"over {_MAX_RECORD_BYTES} bytes")
        return Promotion.model_validate_json(data)
    except (OSError, ValueError) as exc:  # ValidationError is a ValueError
        why = validation_message(exc, "record") if isinstance(exc, ValidationError) else str(exc)
        logger.warning("promotion record %s unreadable (%s): not served unless pinned", path, why)
        return Promotion(
            state=PromotionState.CANDIDATE,
            decided_by="unrecorded",
            reason=f"its promotion record {path.name} is unreadable ({why[:500]}); promote it "
            "again or pin it",
        )
