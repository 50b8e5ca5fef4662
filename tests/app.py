"""A Celery app with tracked tasks, configured from environment variables.

Worker processes started by the tests load it with ``-A tests.app``; the
test process builds the same app with :func:`make_app` to send tasks.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pymongo
from celery import Celery, Task

import celery_tasktracker
from celery_tasktracker import TrackedTask

_clients: dict[tuple[int, str], pymongo.MongoClient] = {}


class TransientPartnerError(ConnectionError):
    """A partner API outage: categorized ``transient``."""


def make_app(
    *,
    broker_url: str,
    mongodb_uri: str,
    database: str,
    queue: str,
    result_backend: str | None = None,
    extra_conf: dict[str, Any] | None = None,
    tracked: bool = True,
) -> Celery:
    """Build the test app; every name that tests share is a parameter."""
    app = Celery("tests.app", broker=broker_url, backend=result_backend,
                 set_as_current=True)
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=result_backend is None,
        tasktracker_mongodb_uri=mongodb_uri,
        tasktracker_database=database,
        tasktracker_lease=30,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_transport_options={"visibility_timeout": 3600},
    )
    app.conf.update(extra_conf or {})
    if tracked:
        celery_tasktracker.install(app)
    _register_tasks(app, TrackedTask if tracked else Task)
    return app


def body_runs(app: Celery) -> pymongo.collection.Collection:
    """The collection where task bodies record each run, for counting."""
    key = (os.getpid(), app.conf.tasktracker_mongodb_uri)
    if key not in _clients:
        _clients[key] = pymongo.MongoClient(app.conf.tasktracker_mongodb_uri, tz_aware=True)
    return _clients[key][app.conf.tasktracker_database]["body_runs"]


def _note_run(task: Any, key: str, **extra: Any) -> None:
    body_runs(task.app).insert_one({
        "key": key, "task": task.name, "celeryTaskId": task.request.id,
        "retries": task.request.retries, "pid": os.getpid(),
        "hostname": task.request.hostname, "at": time.time(), **extra,
    })


def _register_tasks(app: Celery, base: type[Task]) -> None:
    @app.task(shared=False, base=base, bind=True, name="tests.notify")
    def notify(self: TrackedTask, user_id: Any, channel: str = "email",
               seconds: float = 0.0) -> str:
        worker_task_id = execution_id = None
        if isinstance(self, TrackedTask):
            worker_task_id = self.build_task_key(self.request.args,
                                                 self.request.kwargs).task_id
            if self.current_execution is not None:
                execution_id = self.current_execution.execution_id
        _note_run(self, f"notify:{user_id}:{channel}", workerTaskId=worker_task_id,
                  executionId=execution_id)
        time.sleep(seconds)
        return f"sent {channel} to {user_id}"

    @app.task(shared=False, base=base, bind=True, name="tests.flaky", max_retries=3,
              default_retry_delay=0.2)
    def flaky(self: TrackedTask, key: str, failures: int) -> str:
        _note_run(self, key)
        if self.request.retries < failures:
            raise TransientPartnerError(f"partner API unavailable for {key}")
        return f"done {key}"

    @app.task(shared=False, base=base, bind=True, name="tests.backoff",
              max_retries=2, default_retry_delay=4)
    def backoff(self: TrackedTask, key: str) -> str:
        _note_run(self, key)
        if self.request.retries == 0:
            raise TransientPartnerError(f"partner API unavailable for {key}")
        return f"done {key}"

    @app.task(shared=False, base=base, bind=True, name="tests.explicit_retry",
              max_retries=2)
    def explicit_retry(self: TrackedTask, key: str) -> None:
        _note_run(self, key)
        try:
            raise LookupError(f"record {key} not ready")
        except LookupError as exc:
            raise self.retry(exc=exc, countdown=0.2) from exc

    @app.task(shared=False, base=base, bind=True, name="tests.per_call_retry",
              max_retries=5)
    def per_call_retry(self: TrackedTask, key: str) -> None:
        _note_run(self, key)
        try:
            raise LookupError(f"record {key} not ready")
        except LookupError as exc:
            raise self.retry(exc=exc, countdown=0.2, max_retries=1) from exc

    @app.task(shared=False, base=base, bind=True, name="tests.auto_retry",
              autoretry_for=(KeyError,), retry_kwargs={"max_retries": 2, "countdown": 0.2})
    def auto_retry(self: TrackedTask, key: str) -> None:
        _note_run(self, key)
        raise KeyError(key)

    @app.task(shared=False, base=base, bind=True, name="tests.reject_input")
    def reject_input(self: TrackedTask, key: str, payload: dict[str, Any]) -> None:
        _note_run(self, key)
        raise ValueError(f"invalid payload for {key}: {payload!r}")

    @app.task(shared=False, base=base, bind=True, name="tests.double")
    def double(self: TrackedTask, key: str, value: int) -> int:
        _note_run(self, key)
        return value * 2

    @app.task(shared=False, base=base, bind=True, name="tests.total")
    def total(self: TrackedTask, values: list[int], key: str) -> int:
        _note_run(self, key, values=values)
        return sum(values)

    @app.task(shared=False, bind=True, name="tests.plain")
    def plain(self: Any, key: str) -> str:
        _note_run(self, key)
        return key

