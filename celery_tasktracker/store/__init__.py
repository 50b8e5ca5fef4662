"""Storage of execution records: the status names and the MongoDB store."""

from __future__ import annotations

from .base import (
    ACTIVE_STATUSES,
    ARCHIVED,
    COMPLETED,
    DLQ,
    FAILED,
    FINAL_STATUSES,
    PROCESSING,
    QUEUED,
    STATUSES,
)
from .mongo import MongoStore

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
    "MongoStore",
]
