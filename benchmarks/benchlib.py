"""Shared helpers of the benchmarks: environment report, command counting, workers."""

from __future__ import annotations

import collections
import importlib.metadata
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pymongo
from kombu import Connection, Exchange, Queue

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

REDIS_URL = os.environ.get("TASKTRACKER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
AMQP_URL = os.environ.get("TASKTRACKER_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: Redis database where task bodies count their runs and the peers keep their locks.
COUNTER_URL = os.environ.get("TASKTRACKER_BENCH_COUNTER_URL", "redis://127.0.0.1:6379/12")
BROKERS = {"redis": REDIS_URL, "rabbitmq": AMQP_URL}

#: Collection of the execution records (the tracker's default).
COLLECTION = "task_tracker"


def unique_name(prefix: str) -> str:
    """Return a queue or database name that no other run uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def print_environment(
    *, brokers: Sequence[str], store_uri: str, extra: Sequence[str] = (),
) -> None:
    """Print the versions, brokers, store server and CPU this run measured."""
    print("Environment")
    print(f"  {'Python':<19} {platform.python_version()} ({platform.python_implementation()})")
    print(f"  {'platform':<19} {platform.platform()}")
    print(f"  {'CPU':<19} {os.cpu_count()} cores, {_cpu_model()}")
    print(f"  {'load average':<19} {os.getloadavg()[0]:.2f} (1 minute, at start; other "
          "processes on the machine add noise)")
    for name in ("celery", "kombu", "pymongo", "redis", "amqp", "celery-tasktracker", *extra):
        print(f"  {name:<19} {_version(name)}")
    for broker in brokers:
        print(f"  {'broker':<19} {_mask(broker)}{_broker_server(broker)}")
    print(f"  {'store server':<19} {describe_store(store_uri)}")
    print()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown model"


def _broker_server(url: str) -> str:
    # The server's own version, where the transport reports one.
    if not url.startswith(("redis://", "amqp://")):
        return ""
    try:
        with Connection(url, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
            if url.startswith("redis://"):
                client = connection.default_channel.client
                return f" (Redis {client.info('server')['redis_version']})"
            properties = connection.connection.server_properties
            return f" (RabbitMQ {properties.get('version', 'unknown version')})"
    except Exception as exc:
        return f" (server version unavailable: {exc})"


def _mask(url: str) -> str:
    from celery_tasktracker.config import mask_uri

    return mask_uri(url)


def describe_store(uri: str) -> str:
    """Return the store server's name and version as it reports them."""
    client: pymongo.MongoClient[dict[str, Any]]
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
        info = client.admin.command("buildInfo")
    version = info.get("version", "unknown version")
    if os.environ.get("TASKTRACKER_TEST_MONGODB_URI"):
        return f"MongoDB-compatible server {version} at {_mask(uri)}"
    return (f"SecantusDB {_version('secantusdb')} (reports MongoDB {version}), "
            f"in-memory storage, {_mask(uri)}")


# -- command counting -------------------------------------------------------

def describe_counts(counts: collections.Counter[str]) -> str:
    """Render counted commands as ``total (label, label x2)``."""
    if not counts:
        return "0"
    parts = [label if n == 1 else f"{label} x{n}" for label, n in sorted(counts.items())]
    return f"{sum(counts.values())} ({', '.join(parts)})"


# -- waiting and statistics -------------------------------------------------

def wait_for(condition: Callable[[], Any], *, timeout: float, message: str,
             interval: float = 0.02) -> Any:
    """Poll *condition* until it returns a truthy value; raise after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)


def median(values: Sequence[float]) -> float:
    """Return the median of *values*."""
    return float(statistics.median(values))


# -- worker processes -------------------------------------------------------

class WorkerProcess:
    """A ``celery worker`` process of ``benchapp`` consuming one queue.

    It logs at WARNING so that logging does not weigh on the figures, and
    ``benchapp`` signals readiness by creating the file named in the
    ``BENCH_READY_FILE`` environment variable.
    """

    def __init__(self, *, env: dict[str, str], queue: str, concurrency: int = 2,
                 pool: str = "prefork") -> None:
        self.ready_file = os.path.join(tempfile.gettempdir(), unique_name("bench-ready"))
        self.env = {**os.environ, **env, "BENCH_READY_FILE": self.ready_file,
                    "PYTHONPATH": os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")])}
        self.args = [
            sys.executable, "-m", "celery", "-A", "benchapp", "worker", "-P", pool,
            "-c", str(concurrency), "-Q", queue, "-n", f"{unique_name('bench')}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "WARNING",
        ]
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix="bench-worker-", suffix=".log", delete=False,
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.process = subprocess.Popen(
            self.args, env=self.env, cwd=HERE, stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for(self._ready, timeout=timeout, interval=0.2, message="the worker to start")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the worker exited:\n{self.output()[-3000:]}")
        return os.path.exists(self.ready_file)

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        self.process = None
        self.log.close()
        for path in (self.log.name, self.ready_file):
            if os.path.exists(path):
                os.unlink(path)


@contextmanager
def running_worker(**kwargs: Any) -> Iterator[WorkerProcess]:
    """Start a ``benchapp`` worker and stop it on exit."""
    worker = WorkerProcess(**kwargs)
    try:
        worker.start()
        yield worker
    finally:
        worker.stop()


def delete_queues(broker_url: str, names: Sequence[str]) -> None:
    """Delete benchmark queues and their exchanges; missing ones are ignored.

    Every benchmark queue is bound to a direct exchange of the same name,
    as Celery declares its default queue and the tracker its DLQs.
    """
    with Connection(broker_url) as connection:
        for name in names:
            channel = connection.channel()
            try:
                if broker_url.startswith("redis://"):
                    # kombu's Redis transport deletes only the bindings that
                    # the channel has declared, so declare the queue first.
                    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
                    bound = queue(channel)
                    bound.declare()
                    bound.delete()
                else:
                    channel.queue_delete(name)
                    channel.exchange_delete(name)
            except Exception:
                pass
            finally:
                channel.close()
