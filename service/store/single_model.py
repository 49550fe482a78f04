"""Single-model mode: ONE model's folder as the repository, served under a name given from outside.

KServe mounts one model's storage at /mnt/models and names the model after the
InferenceService (decision 42). `open_repository(root, name)` gives the serving stack a
`ModelRepository` whose only model is `name` and whose model folder is ROOT itself:

    ROOT/<version>/   saved_model.pb  variables/  assets/labels.txt  graft.json
    ROOT/policy.json  ROOT/.last-version  ROOT/.lock  ROOT/.staging-*  ROOT/.scratch/

That is exactly what MODEL_ROOT/<model>/ holds in the multi-model layout, so a single-model
view of `models/apple` and the multi-model view of `models` share versions, pin, lock and the
high-water mark that keeps a deleted version's number from being handed out again:
publishing, pinning and the staging clean-up keep every guarantee of `ModelRepository`, and the
retrain job can publish into the repository while a KServe pod serves `models/apple`.

When ROOT holds one version's files directly (KServe's storage initializer given a version's
URI), the version is served read-only, numbered as its graft.json says (1 for an unpublished
export); nothing can be published or pinned there.

The served name need not be the one in graft.json: the name belongs to whoever deploys (an
InferenceService name); the version number and every file hash are still checked.
"""

from pathlib import Path
from typing import NoReturn

from service.errors import BadRequest, ModelNotFound, ReadOnlyRepository
from service.policy import Policy
from service.store.durable import fsync_dir
from service.store.layout import MANIFEST_FILE, SAVED_MODEL_FILE
from service.store.manifest import Manifest, verify_dir
from service.store.repository import (
    ModelRepository,
    validate_name,
    validate_version,
)


def open_repository(root: Path | str, model_name: str | None = None) -> ModelRepository:
    """The repository `graft serve` reads: every model under `root`, or, with `model_name`,
    one model's versions in `root` (or one version's files there)."""
    if model_name is None:
        return ModelRepository(root)
    if any((Path(root) / name).is_file() for name in (SAVED_MODEL_FILE, MANIFEST_FILE)):
        return SingleVersionRepository(root, model_name)
    return SingleModelRepository(root, model_name)


class SingleModelRepository(ModelRepository):
    """ROOT/<version>/ of one model, served as `name`; pins in ROOT/policy.json."""

    def __init__(self, root: Path | str, name: str) -> None:
        super().__init__(root)
        self.name = validate_name(name)

    def models(self) -> list[str]:
        return [self.name] if self.versions(self.name) else []

    def verify(self, name: str, version: int) -> Manifest:
        """Hash every file against the manifest and check its version; its name may differ."""
        return verify_dir(self._existing_version_dir(name, version), version=version)

    def _model_dir(self, name: str, *, create: bool = False) -> Path:
        if validate_name(name) != self.name:
            raise ModelNotFound(
                f"model {name!r} is not served here: this server serves only {self.name!r} "
                "(single-model mode, GRAFT_MODEL_NAME)"
            )
        if self.root.exists() and not self.root.is_dir():
            raise BadRequest(f"the model root {self.root} is not a folder")
        if create and not self.root.is_dir():
            self.root.mkdir(parents=True)
            fsync_dir(self.root.parent)
        return self.root


class SingleVersionRepository(SingleModelRepository):
    """One version's files directly in ROOT, served read-only as the version graft.json names."""

    def __init__(self, root: Path | str, name: str) -> None:
        super().__init__(root, name)
        self._manifest_version = Manifest.read(self.root).version  # ManifestError: not an export
        self.version = self._manifest_version or 1

    def versions(self, name: str) -> list[int]:
        model_dir = self._model_dir(name)
        return [self.version] if (model_dir / MANIFEST_FILE).is_file() else []

    def version_dir(self, name: str, version: int) -> Path:
        model_dir = self._model_dir(name)
        if validate_version(version) != self.version:
            raise ModelNotFound(
                f"model {name!r} has no version {version} (available: {self.version})"
            )
        return model_dir

    def verify(self, name: str, version: int) -> Manifest:
        return verify_dir(self.version_dir(name, version), version=self._manifest_version)

    def pin(self, name: str) -> int | None:
        self._model_dir(name)
        return None

    def policy(self, name: str) -> Policy:
        self._model_dir(name)
        return Policy()

    def update_policy(self, name: str, change: object) -> NoReturn:
        raise self._read_only()

    def scratch(self) -> NoReturn:
        raise self._read_only()

    def publish(
        self, export_dir: Path | str, name: str, *, before_rename: object = None
    ) -> NoReturn:
        raise self._read_only()

    def set_pin(self, name: str, version: int | None) -> NoReturn:
        raise self._read_only()

    def _read_only(self) -> ReadOnlyRepository:
        return ReadOnlyRepository(
            f"{self.root} holds a single version's files, which graft serves read-only; to "
            f"publish or pin, lay it out as {self.root}/<version>/ folders instead"
        )
