"""The drain marker: `graft serve` creates it when it starts a graceful stop.

The supervisor process and the BentoML workers share nothing but the environment, so the marker
is a file whose path every worker inherits in GRAFT_DRAIN_FILE.
"""

import os
from pathlib import Path

DRAIN_FILE_VARIABLE = "GRAFT_DRAIN_FILE"


def draining() -> bool:
    """True once `graft serve` has started its graceful stop (read by readiness checks)."""
    marker = os.environ.get(DRAIN_FILE_VARIABLE)
    return bool(marker) and Path(marker).exists()
