"""Status names of an execution record and the helpers shared by stores."""

from __future__ import annotations

import datetime as dt

__all__ = [
    "ACTIVE_STATUSES",
    "ARCHIVED",
    "COMPLETED",
    "DLQ",
    "FAILED",
    "FINAL_STATUSES",
    "PROCESSING",
    "QUEUED",
    "STATUSES",
    "utcnow",
]

QUEUED = "queued"
PROCESSING = "processing"
COMPLETED = "completed"
FAILED = "failed"
DLQ = "dlq"
ARCHIVED = "archived"

STATUSES = (QUEUED, PROCESSING, COMPLETED, FAILED, DLQ, ARCHIVED)
#: Statuses of an execution that may still run its body.
ACTIVE_STATUSES = (QUEUED, PROCESSING)
#: Statuses after which an execution never runs again.
FINAL_STATUSES = (COMPLETED, FAILED, DLQ, ARCHIVED)


def utcnow() -> dt.datetime:
    """Return the current time as an aware UTC datetime with millisecond precision.

    MongoDB stores milliseconds, so truncating here keeps the value a caller
    has equal to the value it reads back.
    """
    now = dt.datetime.now(dt.timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
