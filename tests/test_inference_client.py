"""The entry's client of the inference service, on BentoML's own session manager: it never
reuses a pooled connection that the inference server may already have closed."""

import asyncio
from types import SimpleNamespace

from _bentoml_impl.client.proxy2 import SessionManager

from service.app.inference_client import InferenceClient
from service.protocol.http.connections import KEEP_ALIVE_S, idle_close_s


async def _keepalive_of(sessions: SessionManager) -> float:
    session = await sessions.get_session()
    keepalive = session.connector._keepalive_timeout
    await sessions.close()
    return keepalive


def test_pooled_connections_are_dropped_at_half_the_servers_idle_limit() -> None:
    # aiohttp's own default reuses a connection idle for 15 s; the server closes it after 5 s
    # (or GRAFT_HEADER_TIMEOUT_S): a call sent on it then breaks after being sent.
    for header_timeout_s, expected in ((2.0, 1.0), (30.0, KEEP_ALIVE_S / 2)):
        sessions = SessionManager(url="file:///nonexistent.sock", timeout=5.0, headers={})
        inference = SimpleNamespace(to_async=SimpleNamespace(_session_manager=sessions))
        InferenceClient(inference, idle_close_s(header_timeout_s))
        assert asyncio.run(_keepalive_of(sessions)) == expected
        assert sessions.max_requests > 10**9  # BentoML's recycling (bentoml#4971) is off too
