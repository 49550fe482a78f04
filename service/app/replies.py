"""The inference service's replies: plain pydantic models that carry a GraftError as data."""

from pydantic import BaseModel

from service.errors import GraftError, error_from_code
from service.wire import InferResult, ModelMetadata, ModelStatus


class Reply(BaseModel):
    """A GraftError, if any, across the process boundary (BentoML would turn it into a 500)."""

    error_code: str | None = None
    error: str | None = None

    @classmethod
    def of(cls, exc: GraftError) -> "Reply":
        return cls(error_code=exc.code, error=exc.message)

    def raise_error(self) -> None:
        if self.error_code is not None:
            raise error_from_code(self.error_code, self.error or "failed")


class MetadataReply(Reply):
    metadata: ModelMetadata | None = None


# Replies are plain models, never bare lists: BentoML renders a list reply through a root model
# whose JSON schema it rebuilds on every call to pick the content type (1-1.4 ms of CPU each).
class InferReply(BaseModel):
    results: list[InferResult]


class StatusReply(BaseModel):
    models: list[ModelStatus]
