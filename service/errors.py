"""Errors as data: each carries its HTTP status, gRPC code and a message for the caller."""

import grpc
from pydantic import ValidationError


class GraftError(Exception):
    """Base of every error a caller can see. Subclasses fix the code and statuses."""

    code = "internal"
    http_status = 500
    grpc_status = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(GraftError):
    code, http_status, grpc_status = "bad_request", 400, grpc.StatusCode.INVALID_ARGUMENT


class InvalidImage(GraftError):
    code, http_status, grpc_status = "invalid_image", 400, grpc.StatusCode.INVALID_ARGUMENT


class ImageTooLarge(InvalidImage):
    """More pixels than `max_image_pixels`, read from the header: refused before decoding."""

    code = "image_too_large"


class ExplanationsUnavailable(GraftError):
    """The version was exported before graft baked explanations (the `explain` signature) in."""

    code, http_status = "explanations_unavailable", 400
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION

    @classmethod
    def of(cls, what: str) -> "ExplanationsUnavailable":
        """The error for `what` (e.g. "flowers v3"), saying what to do about it."""
        return cls(
            f"{what} cannot explain its predictions: it was exported before graft added "
            "explanations (it has no `explain` signature). Retrain it with `graft train` and "
            "publish the new export to explain; it still classifies as before"
        )


class Unauthorized(GraftError):
    code, http_status, grpc_status = "unauthorized", 401, grpc.StatusCode.UNAUTHENTICATED


class ManagementDisabled(GraftError):
    code, http_status, grpc_status = "management_disabled", 403, grpc.StatusCode.PERMISSION_DENIED


class ModelNotFound(GraftError):
    code, http_status, grpc_status = "not_found", 404, grpc.StatusCode.NOT_FOUND


class PayloadTooLarge(GraftError):
    code, http_status, grpc_status = "payload_too_large", 413, grpc.StatusCode.RESOURCE_EXHAUSTED


class UnsupportedMediaType(GraftError):
    code, http_status = "unsupported_media_type", 415
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class RejectedModel(GraftError):
    """A pushed model version failed validation; the serving version is untouched."""

    code, http_status = "rejected_model", 422
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class ReadOnlyRepository(GraftError):
    """The served folder cannot take a new version or a pin (one version's files, mounted)."""

    code, http_status = "read_only_repository", 409
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class InsufficientStorage(GraftError):
    """The disk under the model repository (or the push scratch space) is full: nothing was
    published, and the next push works once space is freed."""

    code, http_status = "insufficient_storage", 507
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


class BadModelOutput(GraftError):
    """The model answered an image with probabilities that are not finite: the version is
    broken for that input (its warm-up passed), so nothing is made up in their place."""

    code = "bad_model_output"


class Overloaded(GraftError):
    code, http_status, grpc_status = "overloaded", 503, grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after_s = 1


class DeviceOutOfMemory(Overloaded):
    """The accelerator ran out of memory even on this image alone."""

    code = "device_out_of_memory"


class NotReady(GraftError):
    code, http_status, grpc_status = "not_ready", 503, grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GraftError):
    code, http_status = "deadline_exceeded", 504
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


def error_class(code: str) -> type[GraftError] | None:
    """The GraftError subclass whose `code` is `code` (errors cross processes as data)."""
    pending: list[type[GraftError]] = [GraftError]
    while pending:
        cls = pending.pop()
        if cls.code == code:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def error_from_code(code: str, message: str) -> GraftError:
    """Rebuild the error a server, or the other process, reported as `code` and `message`."""
    return (error_class(code) or GraftError)(message)


def validation_message(exc: ValidationError, whole: str = "body") -> str:
    """pydantic's first complaint as `field.path: what is wrong` (`whole` when it is no field)."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or whole
    return f"{where}: {first['msg']}"
