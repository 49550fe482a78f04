"""The management API behind the bearer token: pin a version, push a new one, record a
version's promotion (the promotion gate, service/store/promotion.py)."""

import asyncio
import hmac
import time
from collections.abc import Awaitable
from functools import partial
from pathlib import Path
from typing import BinaryIO, TypeVar

from pydantic import ValidationError

from service.errors import (
    BadRequest,
    DeadlineExceeded,
    ManagementDisabled,
    ModelNotFound,
    Unauthorized,
    validation_message,
)
from service.gateway.backend_calls import call_backend
from service.gateway.policy_check import check_policy
from service.policy import Policy, PolicyBody
from service.push.archive import PushLimits
from service.push.receive import receive_push
from service.settings import GraftSettings
from service.store.promotion import operator_decision, read_promotions, record_promotion
from service.store.repository import ModelRepository, validate_name, validate_version
from service.store.single_model import open_repository
from service.wire import InferenceBackend, Promotion, PromotionBody, PromotionState

# `POST /models/{name}/versions?promote=...`: the server runs no gate itself (`graft push`
# measures and then records its decision with PUT .../promotion); `always` is what a push did
# before the gate, and stays the default for clients that send nothing.
PUSH_PROMOTIONS = {
    "always": Promotion(
        state=PromotionState.PROMOTED,
        decided_by="always",
        reason="pushed with promote=always: promoted without the gate",
    ),
    "never": Promotion(
        state=PromotionState.CANDIDATE,
        decided_by="never",
        reason="pushed as a candidate (promote=never): record a decision with PUT "
        "/models/{name}/versions/{version}/promotion or `graft promote`",
    ),
}

T = TypeVar("T")


class Management:
    def __init__(self, backend: InferenceBackend, settings: GraftSettings) -> None:
        self._backend = backend
        self._settings = settings
        self._repository = open_repository(settings.model_root, settings.model_name)

    @property
    def repository(self) -> ModelRepository:
        return self._repository

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

    async def set_policy(self, model: str, document: object) -> Policy:
        """Replace `model`'s policy with the JSON `document` (PolicyBody) once it is checked
        against the model (service/gateway/policy_check.py); returns the policy in force."""
        name = validate_name(model)
        if not isinstance(document, dict) or not document:
            raise BadRequest(
                'send the policy as a JSON object, e.g. {"pin": null, "canary": {"version": 3, '
                '"percent": 20}}'
            )
        try:
            body = PolicyBody.model_validate(document)
        except ValidationError as exc:
            raise BadRequest(f"invalid policy: {validation_message(exc)}") from None
        if body.pin is not None:
            self._repository.resolve(name, body.pin)  # ModelNotFound for a missing version
        on_disk = self._repository.versions(name)
        if not on_disk:
            raise ModelNotFound(f"model {name!r} does not exist in the repository")
        deadline = time.monotonic() + self._settings.request_timeout_s
        statuses = await call_backend(self._backend.status(), deadline)
        status = next((s for s in statuses if s.name == name), None)
        promotions = await asyncio.to_thread(read_promotions, self._repository, name)
        check_policy(name, body, status, on_disk, promotions)
        policy = await asyncio.to_thread(self._repository.update_policy, name, partial(_set, body))
        await call_backend(self._backend.refresh(), deadline)
        return policy

    async def push(self, model: str, upload: BinaryIO, promote: str = "always") -> int:
        """Check a tar.gz export through every push gate, publish it, return its version.

        `promote`: `always` (served at once) or `never` (a candidate until a decision is
        recorded with `set_promotion`).

        The archive and manifest gates run here; the TensorFlow gate (load, signatures,
        warm-up) runs in the inference process, which already has TensorFlow.
        """
        name = validate_name(model)
        if promote not in PUSH_PROMOTIONS:
            raise BadRequest(
                f"promote must be always or never, got {promote[:40]!r}: the server runs no "
                "gate itself (`graft push` measures, then records its decision)"
            )
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
            promotion=PUSH_PROMOTIONS[promote],
        )
        await self._push_call(self._backend.refresh())
        return version

    async def set_promotion(self, model: str, version: int, body: object) -> Promotion:
        """Record `version`'s promotion as the JSON `body` (a `PromotionBody`) says;
        `decided_by: operator` keeps the gate's figures already recorded."""
        name, version = validate_name(model), validate_version(version)
        if not isinstance(body, dict):
            raise BadRequest('send a JSON object, e.g. {"state": "promoted", "decided_by": ...}')
        try:
            wanted = PromotionBody.model_validate(body)
        except ValidationError as exc:
            raise BadRequest(
                f"invalid promotion: {validation_message(exc)} (a version promoted at once is "
                "pushed with promote=always)"
            ) from None
        if wanted.decided_by == "operator" and wanted.gate is None:
            decide = partial(operator_decision, state=wanted.state, reason=wanted.reason or None)
        else:
            reason = wanted.reason or f"{wanted.state} by the {wanted.decided_by} decision"
            decided = Promotion(**{**dict(wanted), "reason": reason})
            decide = partial(record_promotion, promotion=decided)
        record = await asyncio.to_thread(decide, self._repository, name, version)
        deadline = time.monotonic() + self._settings.request_timeout_s
        await call_backend(self._backend.refresh(), deadline)
        return record

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


def _set(body: PolicyBody, current: Policy) -> Policy:
    """`body` in force, keeping the server's record (and the canary's start, while the same
    version stays the canary: a ramp from 5 to 20 % keeps its clock)."""
    same = body.canary is not None and current.canary is not None
    same = same and body.canary.version == current.canary.version  # type: ignore[union-attr]
    since = current.canary_since if same else (time.time() if body.canary else None)
    return Policy(
        pin=body.pin,
        canary=body.canary,
        shadow=body.shadow,
        reject_unknown=body.reject_unknown,
        canary_since=since,
        decisions=current.decisions,
    )
