"""blinker signals sent at each step of an execution's lifecycle.

Every signal is sent with the Celery task as sender and keyword arguments
that always include ``task_id`` (the taskId) and, where one exists,
``execution_id`` and ``celery_task_id``. A receiver that raises is logged
and never breaks the task or the send.
"""

from __future__ import annotations

from typing import Any

from blinker import Namespace, Signal
from celery.utils.log import get_logger

__all__ = [
    "duplicate_delivery_skipped",
    "execution_claimed",
    "execution_completed",
    "execution_failed",
    "stuck_execution_found",
    "task_dead_lettered",
    "task_deduplicated",
    "task_replayed",
]

logger = get_logger(__name__)

_signals = Namespace()

#: A send was not published because an equal task is active.
#: Arguments: task_id, execution_id (of the active one), celery_task_id, status.
task_deduplicated = _signals.signal("task-deduplicated")

#: A worker claimed an execution and is about to run its body.
#: Arguments: task_id, execution_id, celery_task_id, attempt, redelivered.
execution_claimed = _signals.signal("execution-claimed")

#: A delivered message was not run because its execution is running, done
#: or superseded. Arguments: task_id, execution_id, celery_task_id, reason.
duplicate_delivery_skipped = _signals.signal("duplicate-delivery-skipped")

#: The body returned. Arguments: task_id, execution_id, celery_task_id,
#: runtime_ms, result (the stored summary).
execution_completed = _signals.signal("execution-completed")

#: The body raised. Arguments: task_id, execution_id, celery_task_id,
#: category, exception, will_retry.
execution_failed = _signals.signal("execution-failed")

#: A finally failed task was published to its dead-letter queue.
#: Arguments: task_id, execution_id, celery_task_id, reason, dlq_queue.
task_dead_lettered = _signals.signal("task-dead-lettered")

#: A dead-lettered task was sent back to its source queue.
#: Arguments: task_id, execution_id (the new one), replay_of, celery_task_id.
task_replayed = _signals.signal("task-replayed")

#: Stuck detection found an execution whose lease lapsed or that sat
#: queued too long. Arguments: task_id, execution_id, celery_task_id, status.
stuck_execution_found = _signals.signal("stuck-execution-found")


def send_safely(signal: Signal, sender: Any, **kwargs: Any) -> None:
    """Send *signal*, logging instead of raising when a receiver fails."""
    if not signal.receivers:
        return
    for receiver in list(signal.receivers_for(sender)):
        try:
            receiver(sender, **kwargs)
        except Exception:
            logger.exception(
                "tasktracker: receiver %r of signal %r raised for taskId=%s executionId=%s",
                receiver, getattr(signal, "name", signal), kwargs.get("task_id"),
                kwargs.get("execution_id"),
            )
