"""Calls to the inference side under a deadline, with transport failures as GraftErrors."""

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

from service.errors import DeadlineExceeded, GraftError, Overloaded

logger = logging.getLogger("graft.gateway")
T = TypeVar("T")


async def call_backend(work: Awaitable[T], deadline: float) -> T:
    """Await `work` until `deadline` (a time.monotonic() instant)."""
    try:
        return await asyncio.wait_for(work, timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise DeadlineExceeded(
            "the request did not finish before its deadline; retry, or raise "
            "GRAFT_REQUEST_TIMEOUT_S if the model is slow"
        ) from None
    except GraftError:
        raise
    except Exception as exc:
        raise _transport_error(exc) from exc


def _transport_error(exc: Exception) -> GraftError:
    """The inference service refused or failed a call: 503 when it is overloaded or down."""
    status = getattr(getattr(exc, "error_code", None), "value", None)
    if status == 503:
        return Overloaded("the inference service is overloaded; retry after a second")
    if isinstance(exc, ConnectionError | OSError):
        return Overloaded(f"the inference service is unreachable ({exc}); retry shortly")
    logger.exception("inference call failed", exc_info=exc)
    return GraftError("inference failed unexpectedly; see the server log")
