"""The benchmark app: one tracked, one plain and, when installed, two peer-guarded tasks.

Benchmark scripts build it with :func:`make_app`; worker processes load it
with ``celery -A benchapp worker`` and read the same settings from
``BENCH_*`` environment variables.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery, Task
from celery.signals import worker_ready

import celery_tasktracker
from celery_tasktracker import TrackedTask

#: Redis database where task bodies count their runs (see benchlib.COUNTER_URL).
COUNTER_URL = os.environ.get("TASKTRACKER_BENCH_COUNTER_URL", "redis://127.0.0.1:6379/12")

_counter_clients: dict[int, redis.Redis] = {}


class TransientPartnerError(ConnectionError):
    """A partner outage: the tracked base class retries it as ``transient``."""


def counter_client() -> redis.Redis:
    """Return this process's client of the counter database."""
    pid = os.getpid()
    if pid not in _counter_clients:
        _counter_clients[pid] = redis.Redis.from_url(COUNTER_URL)
    return _counter_clients[pid]


def count_run(counter: str) -> None:
    """Add one to the run counter *counter*: one cheap Redis command per task body."""
    counter_client().incr(counter)


def peers_available() -> dict[str, bool]:
    """Return which peer packages can be imported."""
    available = {}
    for name, module in (("celery-once", "celery_once"), ("celery-singleton", "celery_singleton")):
        try:
            __import__(module)
        except ImportError:
            available[name] = False
        else:
            available[name] = True
    return available


def make_app(
    *,
    broker_url: str,
    mongodb_uri: str,
    database: str,
    queue: str,
    lease: float = 60.0,
    event_listeners: Sequence[Any] = (),
) -> Celery:
    """Build the benchmark app; every name a run shares is a parameter."""
    app = Celery("benchapp", broker=broker_url, set_as_current=True)
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        tasktracker_mongodb_uri=mongodb_uri,
        tasktracker_database=database,
        tasktracker_lease=lease,
        # celery-once and celery-singleton keep their locks in Redis.
        ONCE={"backend": "celery_once.backends.Redis",
              "settings": {"url": COUNTER_URL, "default_timeout": 3600}},
        singleton_backend_url=COUNTER_URL,
        singleton_key_prefix=f"bench_singleton_{queue}_",
    )
    celery_tasktracker.install(app, event_listeners=event_listeners)
    _register_tasks(app)
    return app


def _register_tasks(app: Celery) -> None:
    @app.task(shared=False, name="bench.plain")
    def plain(n: int, counter: str) -> int:
        count_run(counter)
        return n

    @app.task(shared=False, base=TrackedTask, name="bench.tracked")
    def tracked(n: int, counter: str) -> int:
        count_run(counter)
        return n

    @app.task(shared=False, base=TrackedTask, bind=True, name="bench.flaky", max_retries=3,
              default_retry_delay=0.1)
    def flaky(self: Task, key: str, failures: int) -> str:
        if self.request.retries < failures:
            raise TransientPartnerError(f"partner unavailable for {key}")
        return key

    @app.task(shared=False, base=TrackedTask, name="bench.invalid")
    def invalid(key: str) -> None:
        raise ValueError(f"invalid input {key!r}")

    @app.task(shared=False, base=TrackedTask, name="bench.sleep")
    def sleep(key: str, seconds: float) -> str:
        time.sleep(seconds)
        return key

    available = peers_available()
    if available["celery-once"]:
        from celery_once import QueueOnce

        @app.task(shared=False, base=QueueOnce, name="bench.once")
        def once(n: int, counter: str) -> int:
            count_run(counter)
            return n

    if available["celery-singleton"]:
        from celery_singleton import Singleton

        @app.task(shared=False, base=Singleton, name="bench.singleton")
        def singleton(n: int, counter: str) -> int:
            count_run(counter)
            return n


def _mark_ready(sender: Any = None, **kwargs: Any) -> None:
    path = os.environ.get("BENCH_READY_FILE")
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(str(os.getpid()))


if os.environ.get("BENCH_BROKER_URL"):
    app = make_app(
        broker_url=os.environ["BENCH_BROKER_URL"],
        mongodb_uri=os.environ["BENCH_MONGODB_URI"],
        database=os.environ["BENCH_DATABASE"],
        queue=os.environ["BENCH_QUEUE"],
    )
    worker_ready.connect(_mark_ready, weak=False)
