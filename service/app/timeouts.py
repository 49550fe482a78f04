"""BentoML's traffic timeouts, derived from graft's own bounds."""

from service.settings import GraftSettings


def traffic_timeouts_s(settings: GraftSettings) -> tuple[float, float]:
    """BentoML's traffic timeouts (inference, entry): backstops behind graft's own bounds.

    BentoML cuts any call that outlives them, so they must outlast the longest of those
    bounds: a request's deadline and a push's model check (load + warm-up, GRAFT_PUSH_CHECK_
    TIMEOUT_S). A push request also spends time receiving and publishing around its check.
    """
    inference = max(settings.request_timeout_s, settings.push_check_timeout_s) + 10
    return inference, inference + settings.request_timeout_s
