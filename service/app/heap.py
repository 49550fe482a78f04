"""The long-lived heap of a serving process, frozen out of the garbage collector.

TensorFlow, ONNX Runtime, BentoML and the loaded versions leave about 475,000 objects in the
process that owns the models, and they live as long as it does (or as their version). Python's
cyclic collector walks every one of them on each generation-2 collection, which the garbage of
requests triggers every few seconds under load: one took 0.6-0.9 s (2 contended cores), the
event loop stopped meanwhile, and every request in flight waited for it. That was the HTTP p99
at 16 clients (`python -m bench.phases`). `gc.freeze()` moves them to a generation that is
never collected.

What is frozen must stay alive, or its memory never comes back: a version unloaded by a hot
swap holds reference cycles (TensorFlow's objects) that only the collector frees. So when a
version goes, the heap is unfrozen, collected once (a full collection, which stops the event
loop) and frozen again. A version that only joins the loaded ones (a hot swap keeps the
previous version loaded) costs no full collection: the young generations are collected and
everything alive is frozen with it.
"""

import gc

from service.wire import ModelStatus, VersionState

Loaded = frozenset[tuple[str, int]]


class FrozenHeap:
    """Freezes the heap once the models are loaded, and again whenever that set changes."""

    def __init__(self) -> None:
        self._frozen_with: Loaded = frozenset()

    def track(self, statuses: list[ModelStatus]) -> None:
        """Called with every status poll (twice a second): cheap unless the versions moved."""
        loaded = frozenset(
            (status.name, version.version)
            for status in statuses
            for version in status.versions
            if version.state == VersionState.AVAILABLE
        )
        if not loaded or loaded == self._frozen_with:
            return
        if self._frozen_with - loaded:  # a version went: its cycles are frozen, free them
            gc.unfreeze()
            gc.collect()
        else:
            gc.collect(1)  # young garbage only: not frozen for ever with the new version
        gc.freeze()
        self._frozen_with = loaded
