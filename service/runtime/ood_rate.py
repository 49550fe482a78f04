"""The out-of-distribution rate per model version: a counter and a gauge over recent images.

`graft_ood_rate` is the share of a version's last WINDOW images that it flagged, so it reads
the same whatever the traffic, and the drift alert (deploy/alerts.yml) compares it with the
~1 % that the threshold lets through on images like the training data.
"""

import threading
from collections import deque

from service import metrics

WINDOW = 1000

_lock = threading.Lock()
_recent: dict[tuple[str, str], deque[bool]] = {}


def record(model: str, version: str, in_distribution: bool) -> None:
    """Count one scored image of `model` `version` (batches run in several threads)."""
    if not in_distribution:
        metrics.OUT_OF_DISTRIBUTION.labels(model, version).inc()
    with _lock:
        recent = _recent.setdefault((model, version), deque(maxlen=WINDOW))
        recent.append(not in_distribution)
        rate = sum(recent) / len(recent)
    metrics.OOD_RATE.labels(model, version).set(rate)
