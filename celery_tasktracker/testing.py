"""Helpers for tests and demos: a throwaway MongoDB-compatible server, a command counter.

The server is SecantusDB's ``secantusd-py`` command (``pip install
secantusdb``), started as a separate process on 127.0.0.1 with in-memory
storage. It is never imported, only run, so it stays a test-only
dependency.
"""

from __future__ import annotations

import collections
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import pymongo
from pymongo import monitoring
from pymongo.errors import PyMongoError

__all__ = [
    "MongoTestServer",
    "StoreCommandCounter",
    "count_by_side",
    "free_port",
    "label_command",
]

#: Environment variable naming a MongoDB server to use instead of starting one.
MONGODB_URI_VARIABLE = "TASKTRACKER_TEST_MONGODB_URI"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_command() -> list[str]:
    found = shutil.which("secantusd-py")
    if found is None:
        candidate = os.path.join(os.path.dirname(sys.executable), "secantusd-py")
        if os.path.exists(candidate):
            found = candidate
    if found is None:
        raise RuntimeError(
            "secantusd-py was not found: install the test server with "
            "`pip install secantusdb==0.7.0b3` (or `pip install -e '.[test]'`), or set "
            f"{MONGODB_URI_VARIABLE} to the URI of a running MongoDB server"
        )
    return [found]


class MongoTestServer:
    """A MongoDB-compatible server for one test session or demo run.

    Uses the server named by ``TASKTRACKER_TEST_MONGODB_URI`` when that is
    set; otherwise starts ``secantusd-py`` on a free port and stops it on
    exit. The server log goes to a temporary file shown in start-up errors.
    """

    def __init__(self, *, startup_timeout: float = 30.0) -> None:
        self.startup_timeout = startup_timeout
        self.uri = os.environ.get(MONGODB_URI_VARIABLE, "")
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self._log_path: str | None = None

    def start(self) -> str:
        """Start the server unless one is configured; return its URI."""
        if self.uri:
            self._wait_ready()
            return self.uri
        self.port = free_port()
        with tempfile.NamedTemporaryFile(
            prefix="secantusd-", suffix=".log", delete=False,
        ) as log:
            self._log_path = log.name
            self.process = subprocess.Popen(
                [*_server_command(), "--host", "127.0.0.1", "--port", str(self.port),
                 "--storage-path", ":memory:", "--standalone", "--log-level", "WARNING"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self.uri = f"mongodb://127.0.0.1:{self.port}"
        self._wait_ready()
        return self.uri

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                break
            try:
                client: pymongo.MongoClient[dict[str, object]]
                with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=500) as client:
                    client.admin.command("ping")
                return
            except PyMongoError as exc:
                last_error = exc
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"MongoDB test server at {self.uri} did not respond within "
            f"{self.startup_timeout:.0f} s ({last_error}); server log: {self.log_text()}"
        )

    def log_text(self) -> str:
        """Return the end of the server log, or an empty string."""
        if not self._log_path or not os.path.exists(self._log_path):
            return ""
        with open(self._log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()[-2000:]

    def stop(self) -> None:
        """Stop the server if this object started it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        if self._log_path and os.path.exists(self._log_path):
            os.unlink(self._log_path)
            self._log_path = None

    def __enter__(self) -> MongoTestServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def label_command(name: str, command: Mapping[str, Any]) -> str:
    """Name the store operation behind one MongoDB command that the tracker sent."""
    if name == "insert":
        documents = command.get("documents") or []
        return "insert" if len(documents) == 1 else f"insert {len(documents)} documents"
    labels = {
        "findAndModify": "find and count duplicate send",
        "find": "read record",
        "delete": "delete unused records",
        "createIndexes": "create indexes",
    }
    if name != "update":
        return labels.get(name, name)

    update = (command.get("updates") or [{}])[0]
    query = update.get("q") or {}
    change = update.get("u") or {}
    status = (change.get("$set") or {}).get("status")
    if isinstance(query.get("celeryTaskId"), Mapping) and "$in" in query["celeryTaskId"]:
        return "renew leases"
    if query.get("status") == "queued" and status == "processing":
        return "claim"
    if status == "completed":
        return "record success"
    if status in ("failed", "dlq"):
        return f"record {status}"
    if "$inc" in change:
        return "count " + ", ".join(change["$inc"])
    return "update"


class StoreCommandCounter(monitoring.CommandListener):
    """Record the commands sent to the tracking collection, with the sending thread.

    Attach it with ``celery_tasktracker.install(app, event_listeners=[counter])``
    to count store round trips, for example to check in a test that a task
    lifecycle makes no more of them than expected. Commands on other
    collections are ignored.
    """

    def __init__(self, collection: str = "task_tracker") -> None:
        self.collection = collection
        self._lock = threading.Lock()
        #: ``(thread name, operation label, command document)`` in sending order.
        self.commands: list[tuple[str, str, Mapping[str, Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command.get(event.command_name) != self.collection:
            return
        label = label_command(event.command_name, event.command)
        with self._lock:
            self.commands.append((threading.current_thread().name, label, event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Ignore replies: a round trip is counted when its command starts."""

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Ignore failures: a round trip is counted when its command starts."""

    def take(self) -> list[tuple[str, str, Mapping[str, Any]]]:
        """Return the commands recorded since the last call and forget them."""
        with self._lock:
            commands = list(self.commands)
            self.commands.clear()
        return commands


def count_by_side(
    commands: list[tuple[str, str, Mapping[str, Any]]], producer_thread: str = "MainThread",
) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Count commands by label: those sent by *producer_thread* and those sent by others."""
    producer: collections.Counter[str] = collections.Counter()
    worker: collections.Counter[str] = collections.Counter()
    for thread, label, _command in commands:
        (producer if thread == producer_thread else worker)[label] += 1
    return producer, worker
