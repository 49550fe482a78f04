"""Slow and idle HTTP connections are closed: a request's headers have a deadline (slowloris).

uvicorn (under BentoML 1.4) closes a connection that stays idle after an answer
(`timeout_keep_alive`, 5 s), but nothing else: a connection that never sends a byte, or sends
its request line and headers one byte at a time, stays open for ever and holds a socket, a
file descriptor and a protocol object. `install(header_timeout_s)` swaps in uvicorn's HTTP
protocol with one more timer: a request's line and headers must be complete within
`header_timeout_s` of the connection opening, or of the previous answer on it; otherwise the
connection is closed. A body that trickles is the request guard's job (GRAFT_BODY_TIMEOUT_S).
uvicorn looks its protocol class up when it starts serving, so install before that.
"""

import asyncio
from typing import Any

from uvicorn.protocols.http import auto

_BaseProtocol: type[Any] = auto.AutoHTTPProtocol  # httptools' when installed, else h11's
KEEP_ALIVE_S = 5.0  # uvicorn's timeout_keep_alive, which BentoML 1.4 leaves at its default


def idle_close_s(header_timeout_s: float) -> float:
    """How long a connection may stay idle after an answer before this server closes it."""
    return min(KEEP_ALIVE_S, header_timeout_s)


class DeadlineHTTPProtocol(_BaseProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's protocol, where waiting for a request's headers has a deadline."""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request on this connection gets the same deadline

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        waiting_since = self.cycle  # a new cycle exists once the next request's headers are in
        self._header_timer = self.loop.call_later(
            self.header_timeout_s, self._headers_overdue, waiting_since
        )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_overdue(self, waiting_since: Any) -> None:
        self._header_timer = None
        no_new_request = self.cycle is waiting_since
        # A pipelined request still being answered re-arms the timer when its answer is out.
        idle = self.cycle is None or self.cycle.response_complete
        if no_new_request and idle and not self.transport.is_closing():
            self.transport.close()


def install(header_timeout_s: float) -> None:
    """Every HTTP connection uvicorn accepts from now on gets the header deadline."""
    DeadlineHTTPProtocol.header_timeout_s = header_timeout_s
    auto.AutoHTTPProtocol = DeadlineHTTPProtocol  # type: ignore[misc]
