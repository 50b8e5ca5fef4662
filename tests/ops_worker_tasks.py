"""Adds the operations tests' tasks to a worker: ``celery worker --include`` this module."""

from __future__ import annotations

from tests.ops_app import register_ops_tasks
from tests.worker_app import app

register_ops_tasks(app)
