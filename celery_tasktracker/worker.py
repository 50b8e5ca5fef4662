"""Worker main-process hooks: lost pool processes, hard time limits, revokes."""

from __future__ import annotations

import datetime as dt
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.utils.log import get_logger
from celery.worker.request import Request

from .store.base import FAILED, PROCESSING, QUEUED, utcnow

__all__ = ["TrackedRequest", "on_task_revoked"]

logger = get_logger(__name__)


def _store_of(task: Any) -> Any:
    from .extension import get_tracker

    return get_tracker(task.app).store


def _close_execution(task: Any, celery_task_id: str, *, statuses: tuple[str, ...],
                     fields: dict[str, Any], what: str, hostname: str | None = None) -> None:
    # Runs in the worker's main process, so every error is logged, not raised.
    # With *hostname*, only records claimed by that worker are closed.
    now = utcnow()
    query: dict[str, Any] = {"celeryTaskId": celery_task_id, "status": {"$in": list(statuses)}}
    if hostname is not None:
        query["worker.hostname"] = hostname
    try:
        _store_of(task).collection.update_many(
            query,
            {"$set": {"updatedAt": now, **fields}, "$unset": {"leaseExpiresAt": ""}},
        )
    except Exception as exc:
        logger.warning(
            "tasktracker: could not record %s of %s (celery task id %s): %s",
            what, task.name, celery_task_id, exc,
        )


def _expire_lease(request: Any) -> None:
    # The pool process died: let the redelivery, or stuck detection, take the
    # execution over now instead of after the lease runs out.
    now = utcnow()
    try:
        # Matching the hostname keeps this worker from expiring a successor
        # that another worker took over with the same celery task id.
        _store_of(request.task).collection.update_many(
            {"celeryTaskId": request.id, "status": PROCESSING,
             "worker.hostname": request.hostname},
            {"$set": {"leaseExpiresAt": now - dt.timedelta(milliseconds=1),
                      "updatedAt": now, "workerLost": True}},
        )
    except Exception as exc:
        logger.warning(
            "tasktracker: could not expire the lease of %s (celery task id %s): %s",
            request.name, request.id, exc,
        )


class TrackedRequest(Request):  # type: ignore[misc]
    """Worker request of tracked tasks; runs in the worker's main process."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, WorkerLostError):
            _expire_lease(self)
        return super().on_failure(exc_info, send_failed_event=send_failed_event,
                                  return_ok=return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        result = super().on_timeout(soft, timeout)
        if not soft:
            # The pool process is killed, so the task's own hooks never run:
            # record the timeout and release the dedup key here.
            now = utcnow()
            fields = {
                "status": FAILED, "active": False, "completedAt": now, "finishedAt": now,
                "errorCategory": "timeout",
                "errorType": "billiard.exceptions.TimeLimitExceeded",
                "errorMessage": f"hard time limit ({timeout} s) exceeded",
            }
            _close_execution(self.task, self.id, statuses=(PROCESSING,),
                             what="the hard time limit", fields=fields,
                             hostname=self.hostname)
        return result


def on_task_revoked(sender: Any = None, request: Any = None, terminated: bool = False,
                    expired: bool = False, **kwargs: Any) -> None:
    """Release the dedup key of a revoked or expired tracked task at once.

    Celery 5.7 sends the task as *sender* and a task ``Context`` as *request*,
    whose ``task`` attribute is only the task name.
    """
    from .task import TrackedTask

    if request is None or not isinstance(sender, TrackedTask):
        return
    reason = "revoked"
    if expired:
        reason = "expired"
    elif terminated:
        reason = "terminated"
    now = utcnow()
    fields = {
        "status": FAILED, "active": False, "completedAt": now, "finishedAt": now,
        "revoked": True,
        "errorCategory": "permanent", "errorType": "celery.exceptions.TaskRevokedError",
        "errorMessage": f"task {reason}",
    }
    _close_execution(sender, request.id, statuses=(QUEUED, PROCESSING), what="the revoke",
                     fields=fields)
