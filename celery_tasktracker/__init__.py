"""Deterministic task ids, deduplication, idempotent execution and a DLQ for Celery."""

from __future__ import annotations

from .batch import send_group
from .categories import categorize
from .config import SETTINGS, TrackerConfig
from .exceptions import (
    DuplicateTaskError,
    InvalidTaskIdError,
    StoreUnavailableError,
    TaskIdError,
    TaskTrackerError,
)
from .extension import TaskTracker, get_tracker, install
from .ids import build_task_id, new_execution_id, validate_execution_id, validate_task_id
from .publish import TaskKey
from .task import TrackedTask

__version__ = "0.1.0"

__all__ = [
    "SETTINGS",
    "DuplicateTaskError",
    "InvalidTaskIdError",
    "StoreUnavailableError",
    "TaskIdError",
    "TaskKey",
    "TaskTracker",
    "TaskTrackerError",
    "TrackedTask",
    "TrackerConfig",
    "__version__",
    "build_task_id",
    "categorize",
    "get_tracker",
    "install",
    "new_execution_id",
    "send_group",
    "validate_execution_id",
    "validate_task_id",
]
