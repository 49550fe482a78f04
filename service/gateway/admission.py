"""The bound on images waiting for inference: refuse at once (503) rather than queue for ever."""

from collections.abc import Iterator
from contextlib import contextmanager

from service import metrics
from service.errors import Overloaded


class Admission:
    def __init__(self, max_queue: int) -> None:
        self._max_queue = max_queue
        self._queued = 0

    @property
    def queued(self) -> int:
        """Callers' images admitted and not answered yet."""
        return self._queued

    @contextmanager
    def admitted(self, count: int) -> Iterator[None]:
        """Hold `count` places in the queue for the block; Overloaded when they are not free."""
        if self._queued + count > self._max_queue:
            raise Overloaded(
                f"{self._queued} images are already waiting for inference "
                f"(limit {self._max_queue}); retry after a second"
            )
        self._queued += count
        metrics.IMAGES_IN_FLIGHT.inc(count)
        try:
            yield
        finally:
            self._queued -= count
            metrics.IMAGES_IN_FLIGHT.dec(count)
