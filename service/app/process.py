"""What every BentoML worker process of graft reads once, at import: its settings (GRAFT_*
variables, which `graft serve` exports) and the traffic timeouts derived from them.

Importing it also installs graft's replacement of BentoML's request timeout, which must happen
before BentoML builds the apps of graft's services.
"""

from service.app.timeouts import traffic_timeouts_s
from service.protocol.http import timeout
from service.settings import GraftSettings

SETTINGS = GraftSettings()
INFERENCE_TIMEOUT_S, ENTRY_TIMEOUT_S = traffic_timeouts_s(SETTINGS)
timeout.install()
