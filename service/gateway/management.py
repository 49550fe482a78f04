"""The management API behind the bearer token: pin a version, push a new one."""

import asyncio
import hmac
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import BinaryIO, TypeVar

from service.errors import DeadlineExceeded, ManagementDisabled, ModelNotFound, Unauthorized
from service.gateway.backend_calls import call_backend
from service.push.archive import PushLimits
from service.push.receive import receive_push
from service.settings import GraftSettings
from service.store.repository import validate_name
from service.store.single_model import open_repository
from service.wire import InferenceBackend

T = TypeVar("T")


class Management:
    def __init__(self, backend: InferenceBackend, settings: GraftSettings) -> None:
        self._backend = backend
        self._settings = settings
        self._repository = open_repository(settings.model_root, settings.model_name)

    def authorize(self, authorization: str | None) -> None:
        """Check `Authorization: Bearer <token>` for the management API (constant time)."""
        token = self._settings.admin_token
        if token is None:
            raise ManagementDisabled(
                "the management API is off; set GRAFT_ADMIN_TOKEN on the server to enable it"
            )
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthorized("send `Authorization: Bearer <GRAFT_ADMIN_TOKEN>`")
        if not hmac.compare_digest(presented.strip().encode(), token.get_secret_value().encode()):
            raise Unauthorized("the bearer token is wrong")

    async def set_pin(self, model: str, version: int | None) -> None:
        """Pin `model` to `version` (rollback = pin an older one), or follow the newest (None)."""
        name = validate_name(model)
        if version is not None:
            self._repository.resolve(name, version)  # ModelNotFound for a missing version
        elif not self._repository.versions(name):
            raise ModelNotFound(f"model {name!r} does not exist in the repository")
        self._repository.set_pin(name, version)
        deadline = time.monotonic() + self._settings.request_timeout_s
        await call_backend(self._backend.refresh(), deadline)

    async def push(self, model: str, upload: BinaryIO) -> int:
        """Check a tar.gz export through every push gate, publish it, return its version.

        The archive and manifest gates run here; the TensorFlow gate (load, signatures,
        warm-up) runs in the inference process, which already has TensorFlow.
        """
        name = validate_name(model)
        loop = asyncio.get_running_loop()

        def check_model(folder: Path, model_name: str) -> None:  # called in a worker thread
            check = self._push_call(self._backend.check_model(str(folder), model_name))
            asyncio.run_coroutine_threadsafe(check, loop).result()

        version = await asyncio.to_thread(
            receive_push,
            upload,
            name=name,
            repository=self._repository,
            limits=PushLimits.from_settings(self._settings),
            check_model=check_model,
        )
        await self._push_call(self._backend.refresh())
        return version

    async def _push_call(self, work: Awaitable[T]) -> T:
        """A push's backend call, under GRAFT_PUSH_CHECK_TIMEOUT_S instead of the request
        deadline: loading and warming up a big model can take minutes."""
        timeout_s = self._settings.push_check_timeout_s
        try:
            return await call_backend(work, time.monotonic() + timeout_s)
        except DeadlineExceeded:
            raise DeadlineExceeded(
                f"the push's model check did not finish within {timeout_s:g} s; raise "
                "GRAFT_PUSH_CHECK_TIMEOUT_S if the model really is that slow to load"
            ) from None
