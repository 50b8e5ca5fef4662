"""Fault-test helpers: a restartable MongoDB server, killable workers, body-run counts."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pymongo
import redis
from celery import Celery
from celery.result import AsyncResult
from pymongo.errors import PyMongoError

from celery_tasktracker import get_tracker
from celery_tasktracker.testing import free_port
from tests.fault_app import BODY_RUNS, FaultSettings, make_fault_app
from tests.harness import WorkerProcess, delete_queues, unique_name, wait_for

__all__ = [
    "FaultCluster",
    "RestartableMongo",
    "fault_cluster",
    "kill_pool_child",
    "kill_worker",
    "purge_redis_queues",
]

#: Worker app module that reads :class:`FaultSettings` from the environment.
FAULT_WORKER_APP = "tests.fault_worker_app"


class RestartableMongo:
    """A MongoDB test server on a fixed port whose data survives a restart.

    The data lives in a temporary directory instead of ``:memory:``, and
    :meth:`stop` sends SIGTERM so the server writes everything out before
    it exits. Every start uses the same port, so clients reconnect to the
    same URI.
    """

    def __init__(self, *, startup_timeout: float = 30.0) -> None:
        self.port = free_port()
        self.uri = f"mongodb://127.0.0.1:{self.port}"
        self.storage = tempfile.mkdtemp(prefix="tt-faults-mongo-")
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.storage, "server.log")

    def start(self) -> None:
        """Start the server and wait until it responds to a ping."""
        command = shutil.which("secantusd-py") or os.path.join(
            os.path.dirname(sys.executable), "secantusd-py",
        )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [command, "--host", "127.0.0.1", "--port", str(self.port),
                 "--storage-path", os.path.join(self.storage, "data"), "--standalone",
                 "--log-level", "WARNING"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_for(self._answers, timeout=self.startup_timeout, interval=0.1,
                 message=f"the MongoDB test server on port {self.port} to respond")

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"the MongoDB test server exited with {self.process.returncode}"
            )
        client: pymongo.MongoClient[dict[str, Any]]
        try:
            with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=300) as client:
                client.admin.command("ping")
        except PyMongoError:
            return False
        return True

    def stop(self) -> None:
        """Stop the server with SIGTERM; its data stays in the storage directory."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        """Stop the server and delete its data."""
        self.stop()
        shutil.rmtree(self.storage, ignore_errors=True)

    def __enter__(self) -> RestartableMongo:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def kill_pool_child(pid: int, workers: list[WorkerProcess]) -> None:
    """Send SIGKILL to pool process *pid* after checking that one of *workers* owns it."""
    parents = {worker.process.pid for worker in workers if worker.process is not None}
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        # The command name in brackets may contain spaces, the fields after it do not.
        fields = handle.read().rsplit(")", 1)[1].split()
    parent = int(fields[1])
    if parent not in parents:
        raise AssertionError(f"pid {pid} is not a pool process of the test workers")
    os.kill(pid, signal.SIGKILL)


def kill_worker(worker: WorkerProcess) -> None:
    """Send SIGKILL to a worker's whole process group: main process and pool."""
    assert worker.process is not None
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait(timeout=15)


def purge_redis_queues(broker_url: str, queues: list[str]) -> None:
    """Delete the waiting and the unacknowledged Redis messages of *queues*.

    Messages that a killed worker left unacknowledged would otherwise be
    restored into the deleted queues by any later worker on the same
    database. The lists and kombu's binding keys are deleted by name too,
    because kombu deletes a Redis queue only while its binding is recorded
    and leaves the binding keys of the per-queue exchanges.
    """
    if not broker_url.startswith("redis"):
        return
    client = redis.Redis.from_url(broker_url)
    try:
        for tag, raw in client.hscan_iter("unacked"):
            _message, exchange, routing_key = json.loads(raw)
            if exchange in queues or routing_key in queues:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
        bindings = [f"_kombu.{kind}.{queue}" for queue in queues
                    for kind in ("binding", "binding_permanent")]
        client.delete(*queues, *bindings)
    finally:
        client.close()


@dataclasses.dataclass
class FaultCluster:
    """Workers of the fault-test app on one queue, and the app that feeds them."""

    settings: FaultSettings
    app: Celery
    mongo: pymongo.MongoClient[dict[str, Any]]
    workers: list[WorkerProcess] = dataclasses.field(default_factory=list)
    retired: list[WorkerProcess] = dataclasses.field(default_factory=list)

    @property
    def database(self) -> pymongo.database.Database[dict[str, Any]]:
        return self.mongo[self.settings.database]

    def add_worker(self, *, concurrency: int = 2) -> WorkerProcess:
        """Start one more worker and wait until it is ready."""
        worker = WorkerProcess(
            broker_url=self.settings.broker_url, mongodb_uri=self.settings.mongodb_uri,
            database=self.settings.database, queue=self.settings.queue,
            name=unique_name("fw"), concurrency=concurrency, env=self.settings.to_env(),
            app_module=FAULT_WORKER_APP,
        )
        self.workers.append(worker)
        worker.start()
        return worker

    def worker_named(self, hostname: str) -> WorkerProcess:
        """Return the running worker whose node name is *hostname*."""
        for worker in self.workers:
            if hostname.startswith(f"{worker.name}@"):
                return worker
        raise AssertionError(f"no running worker is called {hostname}")

    def kill_worker(self, worker: WorkerProcess) -> None:
        """Kill *worker* with SIGKILL and keep its log for the end of the test."""
        kill_worker(worker)
        self.workers.remove(worker)
        self.retired.append(worker)

    def send(self, key: str, seconds: float = 2.0, tail: float = 0.0,
             **options: Any) -> AsyncResult:
        """Send ``faults.work`` for *key*; *options* go to ``apply_async``."""
        return self.app.tasks["faults.work"].apply_async(
            (key,), {"seconds": seconds, "tail": tail}, **options,
        )

    def task_id(self, key: str, task: str = "faults.work") -> str:
        return str(self.app.tasks[task].build_task_key((key,)).task_id)

    def history(self, key: str, task: str = "faults.work") -> list[dict[str, Any]]:
        return get_tracker(self.app).history(self.task_id(key, task))

    def starts(self, key: str) -> list[dict[str, Any]]:
        """Body-run start records of *key*, oldest first."""
        return list(self.database[BODY_RUNS].find({"key": key, "phase": "start"})
                    .sort("at", 1))

    def completions(self, key: str) -> int:
        """Number of bodies of *key* that ran to the end."""
        return self.database[BODY_RUNS].count_documents({"key": key, "phase": "done"})

    def wait_started(self, key: str, count: int = 1, timeout: float = 30) -> dict[str, Any]:
        """Wait for the *count*-th body start of *key* and return it."""
        starts = wait_for(lambda: (found := self.starts(key)) and len(found) >= count
                          and found, timeout=timeout,
                          message=f"body start {count} of {key}")
        return starts[count - 1]  # type: ignore[no-any-return]

    def wait_completed(self, key: str, timeout: float = 45) -> list[dict[str, Any]]:
        """Wait until the newest execution of *key* is completed; return the history."""
        def settled() -> list[dict[str, Any]] | None:
            chain = self.history(key)
            return chain if chain and chain[-1]["status"] == "completed" else None

        return wait_for(settled, timeout=timeout, message=f"{key} to complete")

    def close(self) -> None:
        for worker in [*self.workers, *self.retired]:
            worker.close()
        queues = [self.settings.queue, f"{self.settings.queue}.dlq",
                  *(worker.private_queue for worker in [*self.workers, *self.retired])]
        delete_queues(self.settings.broker_url, queues)
        purge_redis_queues(self.settings.broker_url, queues)
        with contextlib.suppress(PyMongoError):
            self.mongo.drop_database(self.settings.database)


@contextlib.contextmanager
def fault_cluster(
    broker_url: str, mongodb_uri: str, *, workers: int = 1, concurrency: int = 2,
    **settings: Any,
) -> Iterator[FaultCluster]:
    """Start *workers* fault-test workers on a fresh queue and database."""
    fault_settings = FaultSettings(
        broker_url=broker_url, mongodb_uri=mongodb_uri,
        database=unique_name("ttf").replace("-", "_"), queue=unique_name("ttfq"),
        **settings,
    )
    mongo: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongodb_uri, tz_aware=True, serverSelectionTimeoutMS=5000,
    )
    cluster = FaultCluster(fault_settings, make_fault_app(fault_settings), mongo)
    try:
        for _ in range(workers):
            cluster.add_worker(concurrency=concurrency)
        yield cluster
    finally:
        cluster.close()
        mongo.close()


def seconds_left(start: dict[str, Any]) -> float:
    """Seconds until a running body of the start record *start* finishes sleeping."""
    return float(start["until"]) - time.time()
