"""Worker components: lease renewal of running executions."""

from __future__ import annotations

import datetime as dt
from typing import Any

from celery import Celery, bootsteps
from celery.utils.log import get_logger
from celery.worker import state as worker_state

from .exceptions import StoreUnavailableError
from .store.base import utcnow

__all__ = ["LeaseRenewal", "install_worker_components"]

logger = get_logger(__name__)


class LeaseRenewal(bootsteps.StartStopStep):  # type: ignore[misc]
    """Renew the leases of this worker's running executions on an interval.

    Runs in the worker's main process, which knows every request handed to
    the pool, and renews them all in one bulk write per interval whatever
    the number of running tasks.
    """

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.timer_ref: Any = None

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
