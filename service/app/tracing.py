"""BentoML's OpenTelemetry spans: none unless the user configured tracing.

BentoML's middleware makes three spans per HTTP request (receive, send, send) whether or not
anything exports them: 12 % of the event loop's time per request (decision 50). BentoML 1.4
reads the tracing settings of each service from the service's own config, merged over the
global one with every unset key as None, so the global `tracing.excluded_urls` (for example
in BENTOML_CONFIG_OPTIONS) never reaches the middleware: the exclusion has to be part of the
service's config. The same merge drops a user's global `tracing.*` keys: tracing is set up
per service (`services.graft.tracing.*`), which the README says.
"""

import os
from collections.abc import Mapping
from typing import Any

# Excluded URLs are regular expressions searched in the request URL: "/" is every one.
UNTRACED: dict[str, Any] = {"excluded_urls": "/"}


def tracing_config(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The `tracing` config of graft's BentoML services: every URL excluded, unless BentoML's
    own settings (BENTOML_CONFIG, or a tracing key in BENTOML_CONFIG_OPTIONS) set tracing up,
    in which case BentoML's defaults stand."""
    configured = environ.get("BENTOML_CONFIG") or "tracing." in environ.get(
        "BENTOML_CONFIG_OPTIONS", ""
    )
    return {} if configured else dict(UNTRACED)
