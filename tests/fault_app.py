"""A tracked Celery app for fault tests: late acks, short leases, body-run records.

Worker processes load it through ``tests.fault_worker_app``, which reads a
:class:`FaultSettings` from ``TT_*`` environment variables; the test process
builds the same app with :func:`make_fault_app` to send tasks and read records.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

import pymongo
from celery import Celery
from pymongo.errors import DuplicateKeyError, PyMongoError

import celery_tasktracker
from celery_tasktracker import TrackedTask

__all__ = ["BODY_RUNS", "FaultSettings", "body_runs", "make_fault_app"]

#: Collection where task bodies record each start and each completion.
BODY_RUNS = "body_runs"

#: Seconds a body keeps retrying its own run record while MongoDB is down.
_RECORD_RETRY_SECONDS = 90.0

_clients: dict[tuple[int, str], pymongo.MongoClient[dict[str, Any]]] = {}


@dataclasses.dataclass(frozen=True)
class FaultSettings:
    """Everything a fault-test worker and its producer must agree on."""

    broker_url: str
    mongodb_uri: str
    database: str
    queue: str
    acks_late: bool = True
    lease: float = 3.0
    lease_renewal_interval: float = 0.5
    mongodb_timeout: float = 1.0
    #: Redis only: seconds before an unacknowledged message is delivered again.
    visibility_timeout: float = 3600.0
    store_unavailable: str = "raise"
    dedup_window: float = 300.0

    def to_env(self) -> dict[str, str]:
        """Return the ``TT_*`` environment variables that rebuild these settings."""
        return {
            "TT_BROKER_URL": self.broker_url,
            "TT_MONGODB_URI": self.mongodb_uri,
            "TT_DATABASE": self.database,
            "TT_QUEUE": self.queue,
            "TT_ACKS_LATE": "1" if self.acks_late else "0",
            "TT_LEASE": str(self.lease),
            "TT_LEASE_RENEWAL": str(self.lease_renewal_interval),
            "TT_MONGODB_TIMEOUT": str(self.mongodb_timeout),
            "TT_VISIBILITY_TIMEOUT": str(self.visibility_timeout),
            "TT_STORE_UNAVAILABLE": self.store_unavailable,
            "TT_DEDUP_WINDOW": str(self.dedup_window),
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FaultSettings:
        """Read the settings written by :meth:`to_env`."""
        return cls(
            broker_url=env["TT_BROKER_URL"],
            mongodb_uri=env["TT_MONGODB_URI"],
            database=env["TT_DATABASE"],
            queue=env["TT_QUEUE"],
            acks_late=env.get("TT_ACKS_LATE", "1") == "1",
            lease=float(env.get("TT_LEASE", "3")),
            lease_renewal_interval=float(env.get("TT_LEASE_RENEWAL", "0.5")),
            mongodb_timeout=float(env.get("TT_MONGODB_TIMEOUT", "1")),
            visibility_timeout=float(env.get("TT_VISIBILITY_TIMEOUT", "3600")),
            store_unavailable=env.get("TT_STORE_UNAVAILABLE", "raise"),
            dedup_window=float(env.get("TT_DEDUP_WINDOW", "300")),
        )


def make_fault_app(settings: FaultSettings) -> Celery:
    """Build the fault-test app for *settings*."""
    app = Celery("tests.fault_app", broker=settings.broker_url, set_as_current=True)
    transport_options: dict[str, Any] = {}
    if settings.broker_url.startswith("redis"):
        # Sweep for unacknowledged messages every second (kombu 5.7 sweeps
        # about every 100 seconds by default), so a killed worker's messages
        # come back soon after the visibility timeout. Each sweep holds a
        # Redis lock, and a worker killed during a sweep keeps it until it
        # expires (after 300 seconds by default), which stops every sweep.
        transport_options = {
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": 10,
        }
    app.conf.update(
        task_default_queue=settings.queue,
        task_ignore_result=True,
        task_acks_late=settings.acks_late,
        task_reject_on_worker_lost=settings.acks_late,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        tasktracker_mongodb_uri=settings.mongodb_uri,
        tasktracker_database=settings.database,
        tasktracker_lease=settings.lease,
        tasktracker_lease_renewal_interval=settings.lease_renewal_interval,
        tasktracker_mongodb_timeout=settings.mongodb_timeout,
        tasktracker_store_unavailable=settings.store_unavailable,
        tasktracker_dedup_window=settings.dedup_window,
    )
    celery_tasktracker.install(app)
    _register_tasks(app)
    return app


def body_runs(app: Celery) -> pymongo.collection.Collection[dict[str, Any]]:
    """The collection of body-run records of *app*, with one client per process."""
    uri = app.conf.tasktracker_mongodb_uri
    key = (os.getpid(), uri)
    if key not in _clients:
        _clients[key] = pymongo.MongoClient(
            uri, tz_aware=True, serverSelectionTimeoutMS=1000, connectTimeoutMS=1000,
            socketTimeoutMS=2000,
        )
    return _clients[key][app.conf.tasktracker_database][BODY_RUNS]


def _write_run_record(app: Celery, document: dict[str, Any]) -> None:
    # The record has a fixed _id, so a retry after an insert whose reply was
    # lost finds the first copy instead of adding a second one.
    deadline = time.monotonic() + _RECORD_RETRY_SECONDS
    while True:
        try:
            body_runs(app).insert_one(document)
            return
        except DuplicateKeyError:
            return
        except PyMongoError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _register_tasks(app: Celery) -> None:
    @app.task(shared=False, base=TrackedTask, bind=True, name="faults.work",
              tracking_namespace="faults", tracking_key_args=("key",))
    def work(self: TrackedTask, key: str, seconds: float = 2.0, tail: float = 0.0) -> str:
        """Record a start, sleep *seconds*, record a completion, sleep *tail*.

        The *tail* runs after the body's work is recorded, so a test can
        stop MongoDB between the end of the work and the outcome write.
        """
        run_id = uuid.uuid4().hex
        started = time.time()
        _write_run_record(self.app, {
            "_id": f"{run_id}:start", "key": key, "phase": "start", "pid": os.getpid(),
            "hostname": self.request.hostname, "celeryTaskId": self.request.id,
            "at": started, "until": started + seconds,
        })
        time.sleep(seconds)
        _write_run_record(self.app, {
            "_id": f"{run_id}:done", "key": key, "phase": "done", "pid": os.getpid(),
            "hostname": self.request.hostname, "celeryTaskId": self.request.id,
            "at": time.time(),
        })
        time.sleep(tail)
        return key

    @app.task(shared=False, base=TrackedTask, bind=True, name="faults.overrun",
              tracking_namespace="faults-overrun", tracking_key_args=("key",),
              time_limit=1.5)
    def overrun(self: TrackedTask, key: str, seconds: float = 10.0) -> str:
        """Sleep past the hard time limit, so the pool process is killed."""
        _write_run_record(self.app, {
            "_id": f"{uuid.uuid4().hex}:start", "key": key, "phase": "start",
            "pid": os.getpid(), "hostname": self.request.hostname,
            "celeryTaskId": self.request.id, "at": time.time(),
        })
        time.sleep(seconds)
        return key
