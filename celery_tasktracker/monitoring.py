"""Worker components: lease renewal, per-worker counters and inspect commands."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading
from typing import Any

from celery import Celery, bootsteps
from celery.utils.log import get_logger
from celery.worker import state as worker_state
from celery.worker.control import inspect_command

from .exceptions import StoreUnavailableError
from .store.base import utcnow

__all__ = [
    "COUNTER_NAMES",
    "LeaseRenewal",
    "WorkerCounters",
    "count",
    "install_worker_components",
    "register_inspect_commands",
]

logger = get_logger(__name__)

#: Events counted per worker since it started, in the order of the shared array.
COUNTER_NAMES = (
    "claimed", "skipped_duplicates", "completed", "failed", "retried", "dead_lettered",
)


class WorkerCounters:
    """Counters shared by a worker's main process and its pool processes.

    The array lives in shared memory created before the pool forks, so the
    pool processes increment the same numbers that the main process reports
    to ``celery inspect tasktracker_counters``.
    """

    def __init__(self) -> None:
        self._values = multiprocessing.RawArray("q", len(COUNTER_NAMES))
        self._lock = multiprocessing.Lock()

    def increment(self, name: str) -> None:
        index = COUNTER_NAMES.index(name)
        with self._lock:
            self._values[index] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {name: int(self._values[i]) for i, name in enumerate(COUNTER_NAMES)}


_counters: WorkerCounters | None = None
_counters_lock = threading.Lock()


def count(name: str) -> None:
    """Add one to the worker counter *name*; outside a worker it does nothing."""
    if _counters is not None:
        _counters.increment(name)


def _ensure_counters() -> WorkerCounters:
    global _counters
    with _counters_lock:
        if _counters is None:
            _counters = WorkerCounters()
        return _counters


class LeaseRenewal(bootsteps.StartStopStep):  # type: ignore[misc]
    """Renew the leases of this worker's running executions on an interval.

    Runs in the worker's main process, which tracks every request handed to
    the pool, and renews them all in one bulk write per interval whatever
    the number of running tasks.
    """

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.timer_ref: Any = None
        # Bootsteps are created before the pool starts, so the counters are
        # inherited by every pool process.
        _ensure_counters()

    def start(self, worker: Any) -> None:
        from .extension import get_tracker

        tracker = get_tracker(worker.app)
        interval = tracker.config.renewal_interval
        self.timer_ref = worker.timer.call_repeatedly(interval, self.renew, (worker,))
        logger.debug("tasktracker: renewing leases every %.1f s", interval)

    def stop(self, worker: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None

    def renew(self, worker: Any) -> int:
        """Extend the lease of every execution this worker is running."""
        from .extension import get_tracker

        tracker = get_tracker(worker.app)
        celery_task_ids = [request.id for request in list(worker_state.active_requests)]
        if not celery_task_ids:
            return 0
        lease_until = utcnow() + dt.timedelta(seconds=tracker.config.lease)
        try:
            return tracker.store.renew_leases(
                celery_task_ids, hostname=worker.hostname, lease_expires_at=lease_until,
            )
        except StoreUnavailableError as exc:
            logger.warning(
                "tasktracker: could not renew %d lease(s): %s", len(celery_task_ids), exc,
            )
            return 0


def install_worker_components(app: Celery) -> None:
    """Add the extension's bootsteps to the workers of *app*."""
    if LeaseRenewal not in app.steps["worker"]:
        app.steps["worker"].add(LeaseRenewal)
    register_inspect_commands()


def _tracking_header(request: Any) -> dict[str, Any]:
    headers = getattr(request, "request_dict", None) or {}
    value = headers.get("tasktracker")
    return value if isinstance(value, dict) else {}


def _active_executions(state: Any) -> list[dict[str, Any]]:
    from .extension import get_tracker

    rows = {}
    for request in list(worker_state.active_requests):
        header = _tracking_header(request)
        rows[request.id] = {
            "celeryTaskId": request.id,
            "taskName": request.name,
            "taskId": header.get("taskId"),
            "executionId": header.get("executionId"),
            "attempt": header.get("attempt"),
            "startedAt": None,
            "leaseExpiresAt": None,
        }
    if not rows:
        return []
    try:
        tracker = get_tracker(state.consumer.app)
        records = tracker.store.collection.find(
            {"celeryTaskId": {"$in": list(rows)}, "status": "processing",
             "worker.hostname": state.consumer.hostname},
            {"_id": 0, "celeryTaskId": 1, "taskId": 1, "executionId": 1, "attempt": 1,
             "startedAt": 1, "leaseExpiresAt": 1},
        )
        for record in records:
            row = rows[record["celeryTaskId"]]
            for field in ("taskId", "executionId", "attempt", "startedAt", "leaseExpiresAt"):
                value = record.get(field)
                row[field] = value.isoformat() if isinstance(value, dt.datetime) else value
    except Exception as exc:  # an inspect reply must not fail on a store error
        logger.warning("tasktracker: could not read leases for inspect: %s", exc)
    return [row for row in rows.values() if row["taskId"] is not None]


_registered = False


def register_inspect_commands() -> None:
    """Register the ``tasktracker_*`` inspect commands in this process.

    ``celery inspect`` accepts only commands registered in the calling
    process, so this runs when the extension is installed on an app.
    """
    global _registered
    if _registered:
        return

    @inspect_command(name="tasktracker_active")  # type: ignore[untyped-decorator]
    def tasktracker_active(state: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """List the tracked executions running on this worker."""
        return _active_executions(state)

    @inspect_command(name="tasktracker_counters")  # type: ignore[untyped-decorator]
    def tasktracker_counters(state: Any, **kwargs: Any) -> dict[str, int]:
        """Count claims, skipped duplicates and outcomes since the worker started."""
        return _ensure_counters().snapshot()

    _registered = True
