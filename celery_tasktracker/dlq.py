"""Dead-lettering: publishing finally failed tasks to ``<queue>.dlq``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from celery.exceptions import Reject
from celery.utils.log import get_logger
from kombu.entity import Exchange, Queue

from . import monitoring, signals
from .exceptions import StoreUnavailableError
from .publish import HEADER, HEADER_VERSION
from .store.base import DLQ, utcnow

if TYPE_CHECKING:
    from .task import ExecutionContext, TrackedTask

__all__ = ["dead_letter", "dlq_queue"]

logger = get_logger(__name__)


def dlq_queue(name: str) -> Queue:
    """Return the durable DLQ queue *name*, bound to a direct exchange of that name."""
    exchange = Exchange(name, type="direct")  # type: ignore[no-untyped-call]
    return Queue(  # type: ignore[no-untyped-call]
        name, exchange, routing_key=name, durable=True,
    )


def dead_letter(
    task: TrackedTask,
    context: ExecutionContext,
    *,
    error: Mapping[str, Any],
    reason: str,
) -> str | None:
    """Publish the running task to its DLQ and mark the execution ``dlq``.

    The message carries the original task name, args and kwargs, and a
    tracking header with the failure: reason, category, error type and
    message, source queue and attempt count. Publishing declares the DLQ, as
    RabbitMQ drops messages routed to a queue that was never declared. Returns the
    DLQ name, or ``None`` when the publish failed.
    """
    tracker = task.tracker
    request = task.request
    source = context.queue or str(task.app.conf.task_default_queue)
    dlq_name = tracker.dlq_name(source)
    now = utcnow()
    header = {
        "v": HEADER_VERSION,
        "taskId": context.task_id,
        "executionId": context.execution_id,
        "dlq": {
            "reason": reason,
            "category": error.get("errorCategory"),
            "errorType": error.get("errorType"),
            "errorMessage": error.get("errorMessage"),
            "sourceQueue": source,
            "attempts": context.attempt + 1,
            "failedAt": now.isoformat(),
            "celeryTaskId": context.celery_task_id,
        },
    }

    try:
        task.app.send_task(
            task.name, args=request.args, kwargs=request.kwargs,
            task_id=context.celery_task_id, queue=dlq_queue(dlq_name),
            headers={HEADER: header},
        )
    except Exception as exc:
        logger.exception(
            "tasktracker: could not publish taskId=%s executionId=%s to %s",
            context.task_id, context.execution_id, dlq_name,
        )
        # Keep the arguments on the record so the task is never "failed and
        # nowhere", and with late acks hand the message back: its next
        # delivery publishes to the DLQ again without running the body.
        _record(task, context, error, status="failed", extra={
            "failureReason": reason, "dlqError": f"{type(exc).__name__}: {exc}",
            "dlqPending": True, "dlqQueue": dlq_name, "sourceQueue": source,
            "pendingArgs": list(request.args or ()),
            "pendingKwargs": dict(request.kwargs or {}),
        })
        if task.acks_late:
            raise Reject(f"tasktracker: DLQ publish failed: {exc}", requeue=True) from exc
        return None

    monitoring.count("dead_lettered")
    _record(task, context, error, status=DLQ, extra={
        "dlqPending": False, "dlqReason": reason, "dlqQueue": dlq_name, "sourceQueue": source,
    })
    logger.warning(
        "tasktracker: dead-lettered taskId=%s executionId=%s to %s after %d attempt(s): "
        "%s (%s)", context.task_id, context.execution_id, dlq_name, context.attempt + 1,
        reason, error.get("errorCategory"),
    )
    signals.send_safely(
        signals.task_dead_lettered, task, task_id=context.task_id,
        execution_id=context.execution_id, celery_task_id=context.celery_task_id,
        reason=reason, dlq_queue=dlq_name,
    )
    return dlq_name


def _record(
    task: TrackedTask,
    context: ExecutionContext,
    error: Mapping[str, Any],
    *,
    status: str,
    extra: Mapping[str, Any],
) -> None:
    try:
        task.tracker.store.fail(
            context.execution_id, now=utcnow(), error=error, status=status,
            runtime_ms=context.runtime_ms(), extra=extra,
        )
    except StoreUnavailableError:
        logger.exception(
            "tasktracker: could not record %s for taskId=%s executionId=%s",
            status, context.task_id, context.execution_id,
        )
