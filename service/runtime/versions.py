"""The version manager: keeps the right version of every model loaded, and swaps without a gap.

A daemon thread polls the repository (versions on disk and policy.json) every
`poll_interval_s`. When a model's wanted version (pin, else the newest promoted one: the
promotion gate's records, service/store/promotion.py) is not the active one, it
is loaded, verified and warmed up by `LoadedModel.load` while the active version keeps serving,
then swapped in under a lock: a batch that already took its `LoadedModel` finishes on it. The
replaced version stays loaded as `previous`, so a request resolved just before a swap, or a
rollback to it, needs no load; anything older is dropped. A version that fails to load is
marked FAILED with the reason and never retried (published versions are immutable); without a
pin, the newest version that has not failed is served.

Each model loads in a thread of its own, at most one load per model at a time, so a slow or
hanging load holds back no other model, and the poller stays free: a rollback to `previous`
swaps at once even while a load is in flight. A load that finishes after its model was pinned
to another version is dropped instead of swapped in. `start()` returns once the first loads
are done; `stop()` joins the poller and every load thread.

The policy may also name a canary and a shadow version (service/policy.py). Those are loaded
beside the stable one, after it, in the same one-load-per-model thread, and kept as `trials`
while the policy names them; the stable version is chosen among the other versions, so a
canary is served only to the share of requests the gateway routes to it. A promoted canary
is already warm: it becomes active at once.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from service import metrics
from service.errors import GraftError, ModelNotFound, NotReady
from service.policy import Policy
from service.runtime.loaded_model import LoadedModel
from service.runtime.networks import Engine
from service.runtime.promotion_metrics import PromotionMetrics
from service.store.load_records import LoadRecords, default_state_dir
from service.store.promotion import promoted_versions, promotion_of, read_promotions
from service.store.repository import ModelRepository
from service.wire import ModelStatus, Promotion, VersionState, VersionStatus

logger = logging.getLogger("graft.manager")

Loader = Callable[[ModelRepository, str, int], LoadedModel]
# Puts a loaded version where it serves (stable or trial), under the manager's lock.
_Place = Callable[[str, "_ModelState", LoadedModel], None]
# A hanging load cannot be interrupted; stop() waits this long for it, then leaves it behind
# (load threads are daemons).
STOP_TIMEOUT_S = 30.0


@dataclass
class _ModelState:
    """Everything the manager knows about one model name."""

    active: LoadedModel | None = None
    previous: LoadedModel | None = None
    loading: int | None = None
    load_thread: threading.Thread | None = None
    failed: dict[int, str] = field(default_factory=dict)
    on_disk: list[int] = field(default_factory=list)
    pin: int | None = None
    policy: Policy = field(default_factory=Policy)
    trials: dict[int, LoadedModel] = field(default_factory=dict)  # canary / shadow versions
    promotions: dict[int, Promotion] = field(default_factory=dict)  # the gate's records


class VersionManager:
    def __init__(
        self,
        repository: ModelRepository,
        poll_interval_s: float,
        loader: Loader | None = None,
        engine: Engine = Engine(),
        records: LoadRecords | None = None,
    ) -> None:
        if loader is None:
            loader = partial(LoadedModel.load, engine=engine)
        self._repository = repository
        # FAILED survives restarts, and so does a load that killed the process (a crash loop)
        self._records = records or LoadRecords(default_state_dir(repository))
        self._promotion_metrics = PromotionMetrics()
        self._interval = poll_interval_s
        self._loader = loader
        self._slots: dict[str, _ModelState] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Load what the repository holds now, then keep polling in a daemon thread.

        The first load is synchronous so that a (re)started inference process answers its
        first request with a warm model instead of "still loading".
        """
        for load in self._poll_safely():
            load.join()
        self._thread = threading.Thread(target=self._run, name="graft-version-manager", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and wait (STOP_TIMEOUT_S in all) for the poller and loads in flight."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT_S)
        with self._lock:
            loads = [s.load_thread for s in self._slots.values() if s.load_thread is not None]
        for load in loads:
            load.join(timeout=max(0.0, deadline - time.monotonic()))

    def refresh(self) -> None:
        """Poll now instead of at the next interval (after a push or a policy change)."""
        self._wake.set()

    def ready(self, name: str) -> bool:
        with self._lock:
            slot = self._slots.get(name)
            return slot is not None and slot.active is not None

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The loaded model that serves `name` (`version`, or the active one)."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is None or (slot.active is None and not slot.on_disk):
                raise ModelNotFound(f"model {name!r} does not exist in the repository")
            if version is None:
                if slot.active is None:
                    raise _not_ready(name, slot)
                return slot.active
            loaded = _loaded(slot, version)
            return loaded if loaded is not None else _raise_not_loaded(name, version, slot)

    def status(self) -> list[ModelStatus]:
        with self._lock:
            return [_status(name, slot) for name, slot in sorted(self._slots.items())]

    def poll_once(self) -> None:
        """Scan the repository once and load whatever each model should be serving; returns
        when the loads it started are done (models load side by side)."""
        for load in self._poll():
            load.join()

    def _poll(self) -> list[threading.Thread]:
        """Scan the repository once; start the loads it calls for and return their threads."""
        loads = []
        for name in self._repository.models():
            try:
                on_disk = self._repository.versions(name)
                policy = self._repository.policy(name)
                # after the versions: a version's record is written before it appears
                promotions = read_promotions(self._repository, name)
            except GraftError as exc:
                logger.warning("skipping model %s: %s", name, exc.message)
                continue
            failed = self._recorded_failures(name, on_disk) if name not in self._slots else {}
            with self._lock:
                slot = self._slots.setdefault(name, _ModelState(failed=failed))
                slot.on_disk, slot.pin, slot.policy = on_disk, policy.pin, policy
                slot.promotions = promotions
                choices = _stable_choices(on_disk, policy)
                promoted = promoted_versions(on_disk, promotions)
                wanted = _wanted(choices, policy.pin, slot.failed, promoted)
                load = self._ensure(name, slot, wanted) if wanted is not None else None
                load = load or self._ensure_trials(name, slot)
            self._promotion_metrics.observe(name, on_disk, promotions)
            if load is not None:
                loads.append(load)
        return loads

    def _recorded_failures(self, name: str, on_disk: list[int]) -> dict[int, str]:
        """Once per model and process: the failures that earlier processes recorded, logged
        as a failed load is (a restart must not hide why a version is not served)."""
        failed = self._records.failures(name)
        for version in sorted(set(failed) & set(on_disk)):
            logger.error(
                "model %s version %s FAILED (recorded by an earlier process; not loaded "
                "again): %s", name, version, failed[version],
            )  # fmt: skip
        return failed

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if not self._stop.is_set():
                self._poll_safely()

    def _poll_safely(self) -> list[threading.Thread]:
        try:
            return self._poll()
        except Exception:  # the poller must survive anything a broken repository does
            logger.exception("polling the model repository failed")
            return []

    def _ensure(self, name: str, slot: _ModelState, wanted: int) -> threading.Thread | None:
        """Under the lock: serve `wanted`, swapping at once if it is warm, else by starting
        its load (unless this model has a load in flight: its end wakes the poller)."""
        if slot.active is not None and slot.active.version == wanted:
            return None
        if slot.previous is not None and slot.previous.version == wanted:
            self._swap(name, slot, slot.previous)  # rollback: already warm
            return None
        if wanted in slot.trials:
            self._swap(name, slot, slot.trials.pop(wanted))  # a promoted canary: warm too
            return None
        if wanted in slot.failed or slot.loading is not None or self._stop.is_set():
            return None
        return self._start_load(name, slot, wanted, self._swap_in)

    def _ensure_trials(self, name: str, slot: _ModelState) -> threading.Thread | None:
        """Under the lock: keep loaded the versions the policy serves beside the stable one
        (drop those it no longer names), starting the next missing one's load."""
        named = [v for v in slot.policy.trial_versions() if v in slot.on_disk]
        for version in [v for v in slot.trials if v not in named]:
            dropped = slot.trials.pop(version)
            if _loaded(slot, version) is None:
                _runtime_gauge(dropped).set(0)
        missing = [v for v in named if _loaded(slot, v) is None and v not in slot.failed]
        if not missing or slot.loading is not None or self._stop.is_set():
            return None
        return self._start_load(name, slot, missing[0], _add_trial)

    def _start_load(
        self, name: str, slot: _ModelState, version: int, place: _Place
    ) -> threading.Thread:
        """Under the lock: load `version` in a thread of its own while the active version
        serves; `place` then puts it where it serves (stable or trial), under the lock."""
        slot.loading = version
        slot.load_thread = threading.Thread(
            target=self._load_and_place,
            args=(name, slot, version, place),
            name=f"graft-load-{name}",
            daemon=True,
        )
        slot.load_thread.start()
        return slot.load_thread

    def _load_and_place(self, name: str, slot: _ModelState, version: int, place: _Place) -> None:
        """A load thread's body."""
        loaded = None
        try:
            loaded = self._load(name, version, slot)
        finally:
            with self._lock:
                slot.loading = None
                if loaded is not None:
                    place(name, slot, loaded)
            self._wake.set()  # the wanted version may have moved on during the load

    def _swap_in(self, name: str, slot: _ModelState, loaded: LoadedModel) -> None:
        """Under the lock: a loaded stable version swaps in, unless a pin moved on meanwhile."""
        if slot.pin in (None, loaded.version):
            self._swap(name, slot, loaded)
        else:
            logger.info("model %s version %s dropped: pinned to %s", name, loaded.version, slot.pin)

    def _load(self, name: str, version: int, slot: _ModelState) -> LoadedModel | None:
        started = time.perf_counter()
        self._records.started(name, version)  # left behind if this load kills the process
        try:
            loaded = self._loader(self._repository, name, version)
        except Exception as exc:  # any failure, expected or not, must leave the old version serving
            reason = exc.message if isinstance(exc, GraftError) else f"{type(exc).__name__}: {exc}"
            logger.error("model %s version %s FAILED: %s", name, version, reason)
            self._records.failed(name, version, reason)
            with self._lock:
                slot.failed[version] = reason
            metrics.MODEL_LOADS.labels(name, "failed").inc()
            return None
        self._records.loaded(name, version)
        metrics.MODEL_LOAD_DURATION.labels(name).observe(time.perf_counter() - started)
        metrics.MODEL_LOADS.labels(name, "loaded").inc()
        logger.info("model %s version %s loaded and warm", name, version)
        return loaded

    @staticmethod
    def _swap(name: str, slot: _ModelState, new: LoadedModel) -> None:
        """Under the lock: `new` becomes active, the old active becomes previous."""
        if slot.active is not new:
            dropped = slot.previous
            if dropped is not None and dropped is not new and dropped.version not in slot.trials:
                _runtime_gauge(dropped).set(0)  # dropped from memory
            slot.previous = slot.active
        slot.active = new
        metrics.ACTIVE_VERSION.labels(name).set(new.version)
        _runtime_gauge(new).set(1)
        logger.info("model %s now serves version %s on %s", name, new.version, new.runtime)


def _add_trial(name: str, slot: _ModelState, loaded: LoadedModel) -> None:
    """Under the lock: a loaded canary or shadow version joins the trials, unless the policy
    no longer names it."""
    if loaded.version in slot.policy.trial_versions():
        slot.trials[loaded.version] = loaded
        _runtime_gauge(loaded).set(1)
        logger.info("model %s version %s loaded beside the stable one", name, loaded.version)


def _runtime_gauge(model: LoadedModel) -> Any:
    return metrics.MODEL_RUNTIME.labels(model.name, str(model.version), model.runtime, model.device)


def _wanted(
    on_disk: list[int], pin: int | None, failed: dict[int, str], promoted: list[int]
) -> int | None:
    """The pinned version, else the newest promoted one that has not failed to load
    (candidates and rejected versions serve only when pinned)."""
    if pin is not None:
        return pin if pin in on_disk else None
    good = [v for v in on_disk if v in promoted and v not in failed]
    return good[-1] if good else None


def _stable_choices(on_disk: list[int], policy: Policy) -> list[int]:
    """The versions that may be stable: a canary or shadow version is not, until promoted,
    and a withdrawn canary is not either (a pin is the operator's choice and stands)."""
    if policy.pin is not None:
        return on_disk
    excluded = set(policy.trial_versions()) | policy.withdrawn_versions()
    return [v for v in on_disk if v not in excluded]


def _loaded(slot: _ModelState, version: int) -> LoadedModel | None:
    """The loaded model of `version` (active, previous or a trial), or None."""
    for loaded in (slot.active, slot.previous, *slot.trials.values()):
        if loaded is not None and loaded.version == version:
            return loaded
    return None


def _status(name: str, slot: _ModelState) -> ModelStatus:
    models = (*slot.trials.values(), slot.previous, slot.active)
    loaded = {m.version: m for m in models if m is not None}
    known = sorted(set(slot.on_disk) | set(loaded) | set(slot.failed))
    versions = []
    for version in known:
        if version in slot.failed:
            state, reason = VersionState.FAILED, slot.failed[version]
        elif version in loaded:
            versions.append(_available(loaded[version]))
            continue
        elif version == slot.loading:
            state, reason = VersionState.LOADING, None
        else:
            state, reason = VersionState.UNLOADED, None
        versions.append(VersionStatus(version=version, state=state, reason=reason))
    for status in versions:
        status.promotion = promotion_of(slot.promotions, status.version)
    return ModelStatus(
        name=name,
        active_version=slot.active.version if slot.active else None,
        previous_version=slot.previous.version if slot.previous else None,
        pin=slot.pin,
        versions=versions,
        policy=slot.policy,
    )


def _available(model: LoadedModel) -> VersionStatus:
    return VersionStatus(
        version=model.version,
        state=VersionState.AVAILABLE,
        runtime=model.runtime,
        device=model.device,
        runtime_note=model.runtime_note,
    )


def _not_ready(name: str, slot: _ModelState) -> GraftError:
    if slot.loading is not None:
        return NotReady(f"model {name!r} is still loading version {slot.loading}; retry shortly")
    failed = "; ".join(f"v{v}: {r}" for v, r in sorted(slot.failed.items()))
    return NotReady(f"model {name!r} has no servable version ({failed or 'none loaded yet'})")


def _raise_not_loaded(name: str, version: int, slot: _ModelState) -> LoadedModel:
    if version not in slot.on_disk:
        raise ModelNotFound(
            f"model {name!r} has no version {version} (versions: {slot.on_disk or 'none'})"
        )
    if version in slot.failed:
        raise ModelNotFound(
            f"model {name!r} version {version} failed to load: {slot.failed[version]}"
        )
    serving = [m.version for m in (slot.active, slot.previous) if m is not None]
    raise ModelNotFound(
        f"model {name!r} version {version} is not loaded (loaded: {serving}); "
        f"pin it with PUT /models/{name}/policy to serve it"
    )
