"""Exceptions raised by celery_tasktracker."""

from __future__ import annotations

__all__ = [
    "DuplicateTaskError",
    "InvalidTaskIdError",
    "StoreUnavailableError",
    "TaskIdError",
    "TaskTrackerError",
]


class TaskTrackerError(Exception):
    """Base class of every error raised by celery_tasktracker."""


class TaskIdError(TaskTrackerError, TypeError):
    """The task arguments cannot be turned into a taskId."""


class InvalidTaskIdError(TaskTrackerError, ValueError):
    """A taskId or executionId does not have the required form."""


class StoreUnavailableError(TaskTrackerError):
    """The tracking store could not be reached or rejected an operation."""


class DuplicateTaskError(TaskTrackerError):
    """A send was rejected because an equal task is already active.

    Raised only under the ``raise`` duplicate policy. The attributes name the
    active execution that blocked the send.
    """

    def __init__(
        self,
        task_id: str,
        execution_id: str | None,
        celery_task_id: str | None,
        status: str | None,
    ) -> None:
        self.task_id = task_id
        self.execution_id = execution_id
        self.celery_task_id = celery_task_id
        self.status = status
        super().__init__(
            f"task {task_id!r} is already {status or 'active'} as execution "
            f"{execution_id!r} (celery task id {celery_task_id!r}); pass "
            "tasktracker_force=True to apply_async to send it anyway"
        )
