"""`python -m service.app.server_process`: the BentoML server, as `graft serve`'s child.

The supervisor (service.app.supervisor) runs this in its own process so that it can drain
before the workers stop; the workers import `service.app.entry:Graft` themselves.
"""

import sys

from service.app.entry import Graft
from service.settings import GraftSettings

if __name__ == "__main__":
    settings = GraftSettings()
    Graft.serve_http(host=settings.host, port=settings.port)
    sys.exit(0)
