"""Reading a Prometheus text scrape (`/metrics`) in tests."""

import re


def histogram(text: str, name: str, model: str | None = None, route: str | None = None) -> dict:
    """Sum `_count` and `_sum` of a histogram over the series that match model/route."""
    totals = {"count": 0.0, "sum": 0.0}
    for line in text.splitlines():
        match = re.match(rf"{name}_(count|sum)(?:{{(.*)}})? (\S+)$", line)
        if not match:
            continue
        labels = match.group(2) or ""
        if model and f'model="{model}"' not in labels:
            continue
        if route and f'route="{route}"' not in labels:
            continue
        totals[match.group(1)] += float(match.group(3))
    return totals
