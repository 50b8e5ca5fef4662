"""Tasks of the operations and CLI tests, added to the shared test app.

Worker processes load them with ``--include tests.ops_worker_tasks``; the
test process builds its app with :func:`make_ops_app`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from celery_tasktracker import TrackedTask
from tests.app import body_runs, make_app

__all__ = ["make_ops_app", "register_ops_tasks"]


def make_ops_app(**settings: Any) -> Celery:
    """Build the test app of :func:`tests.app.make_app` with the operations tasks."""
    app = make_app(**settings)
    register_ops_tasks(app)
    return app


def register_ops_tasks(app: Celery) -> None:
    """Register the tasks that the operations tests dead-letter and replay."""

    @app.task(shared=False, base=TrackedTask, bind=True, name="tests.ops.fail_once")
    def fail_once(self: TrackedTask, key: str, note: str = "") -> str:
        # Invalid input on the first run (dead-lettered at once), fixed on replay.
        runs = body_runs(self.app)
        runs.insert_one({"key": key, "celeryTaskId": self.request.id, "note": note})
        if runs.count_documents({"key": key}) == 1:
            raise ValueError(f"invalid input for {key}: missing partner code")
        return f"done {key}"

    @app.task(shared=False, base=TrackedTask, bind=True, name="tests.ops.always_invalid")
    def always_invalid(self: TrackedTask, key: str) -> None:
        body_runs(self.app).insert_one({"key": key, "celeryTaskId": self.request.id})
        raise ValueError(f"invalid input for {key}")
