"""Real worker processes and bounded waits for the integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from kombu import Connection, Exchange, Queue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BROKERS = {
    "redis": os.environ.get("TASKTRACKER_TEST_REDIS_URL", "redis://127.0.0.1:6379/14"),
    "amqp": os.environ.get(
        "TASKTRACKER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//",
    ),
}
RESULT_BACKEND = os.environ.get(
    "TASKTRACKER_TEST_RESULT_BACKEND", "redis://127.0.0.1:6379/13",
)

T = TypeVar("T")


def unique_name(prefix: str) -> str:
    """Return a name no other test run uses, for queues and databases."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_for(
    condition: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.1,
    message: str = "condition",
) -> T:
    """Poll *condition* until it returns a truthy value, or fail after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)


class WorkerProcess:
    """A ``celery worker`` process of a test app (``tests.worker_app`` by default)."""

    def __init__(
        self,
        *,
        broker_url: str,
        mongodb_uri: str,
        database: str,
        queue: str,
        name: str,
        pool: str = "prefork",
        concurrency: int = 2,
        result_backend: str | None = None,
        extra_queues: tuple[str, ...] = (),
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        app_module: str = "tests.worker_app",
    ) -> None:
        self.name = name
        self.private_queue = f"{queue}.{name}"
        self.env = {
            **os.environ,
            "TT_BROKER_URL": broker_url,
            "TT_MONGODB_URI": mongodb_uri,
            "TT_DATABASE": database,
            "TT_QUEUE": queue,
            "TT_RESULT_BACKEND": result_backend or "",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **(env or {}),
        }
        self.args = [
            sys.executable, "-m", "celery", "-A", app_module, "worker",
            "-P", pool, "-c", str(concurrency),
            "-Q", ",".join([queue, self.private_queue, *extra_queues]), "-n", f"{name}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "INFO", *extra_args,
        ]
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in close()
            prefix=f"{name}-", suffix=".log", delete=False,
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        self.process = subprocess.Popen(
            self.args, env=self.env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for(lambda: self._ready(), timeout=timeout, interval=0.2,
                 message=f"worker {self.name} to start; log:\n{self.output()[-3000:]}")
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"worker {self.name} exited with {self.process.returncode}:\n"
                f"{self.output()[-3000:]}"
            )
        return " ready." in self.output()

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        self.process = None

    def close(self) -> None:
        self.stop()
        self.log.close()
        os.unlink(self.log.name)


@contextmanager
def running_workers(count: int, **kwargs: Any) -> Iterator[list[WorkerProcess]]:
    """Start *count* workers with the same settings and stop them on exit."""
    workers = [WorkerProcess(name=unique_name(f"w{index}"), **kwargs) for index in range(count)]
    try:
        for worker in workers:
            worker.start()
        yield workers
    finally:
        for worker in workers:
            worker.close()


def delete_queues(broker_url: str, names: list[str]) -> None:
    """Delete test queues and their exchanges; missing ones are ignored."""
    with Connection(broker_url) as connection:
        for name in names:
            channel = connection.channel()
            try:
                # kombu's Redis transport deletes only the bindings the channel
                # has declared, so the queue is declared before it is deleted.
                queue = Queue(name, Exchange(name, type="direct"), routing_key=name)(channel)
                if broker_url.startswith("redis://"):
                    queue.declare()
                queue.delete()
                channel.exchange_delete(name)
            except Exception:
                pass
            finally:
                channel.close()
