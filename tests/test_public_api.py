"""The public API is exactly what celery_tasktracker exports."""

from __future__ import annotations

import celery_tasktracker


def test_exported_names() -> None:
    assert sorted(celery_tasktracker.__all__) == sorted([
        "SETTINGS", "DuplicateTaskError", "InvalidTaskIdError", "StoreUnavailableError",
        "TaskIdError", "TaskKey", "TaskTracker", "TaskTrackerError", "TrackedTask",
        "TrackerConfig", "__version__", "build_task_id", "categorize", "get_tracker",
        "install", "new_execution_id", "send_group", "validate_execution_id",
        "validate_task_id",
    ])


def test_exported_names_resolve() -> None:
    for name in celery_tasktracker.__all__:
        assert getattr(celery_tasktracker, name) is not None, name
