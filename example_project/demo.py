"""Run the partner sync example end to end with a real worker: ``python -m example_project.demo``.

Without configuration the demo starts its own MongoDB-compatible server
(SecantusDB) and uses kombu's filesystem transport in a temporary folder.
``TASKTRACKER_DEMO_BROKER_URL`` and ``TASKTRACKER_DEMO_MONGODB_URI`` select
a real broker and a real MongoDB server instead, each on its own.

The scenario sends duplicates on purpose: a scheduler fires twice for one
poll window, partner webhooks announce logs that a poll already queued, and
a second poll window lists the same logs again. The demo then waits until
every task has completed or been dead-lettered, prints a report and exits
with status 1 if an attempt ran twice or a sent task was lost.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import IO, Any

import pymongo
from celery import Celery
from kombu import Queue
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url
from pymongo.collection import Collection

import celery_tasktracker
from celery_tasktracker.config import mask_uri
from celery_tasktracker.dlq import dlq_queue
from celery_tasktracker.testing import MongoTestServer

from .partner_sync.environment import (
    BROKER_FOLDER_VARIABLE,
    BROKER_URL_VARIABLE,
    DATABASE_VARIABLE,
    MONGODB_URI_VARIABLE,
    QUEUE,
)
from .report import SETTLED_STATUSES, build_report, latest_executions, render_report

__all__ = ["main"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The app module that the worker loads with ``-A``.
APP_MODULE = "example_project.partner_sync.celery_app"

#: Poll windows of the scenario: the first is sent twice, as by a scheduler
#: that fires twice during a deploy.
FIRST_WINDOW = "20250222T0700"
SECOND_WINDOW = "20250222T0705"

#: Flight logs that partner webhooks announce, each twice, after the first polls.
WEBHOOK_LOGS = (
    ("SATLOC", "695d", "02220710"),
    ("SATLOC", "7c21", "02220815"),
    ("AGNAV", "a3f0", "02231210"),
)

#: Seconds between two reads of the tracker collection while waiting.
POLL_INTERVAL = 0.1


@dataclasses.dataclass
class RunStatus:
    """Whether the run has failed, read by the clean-up that prints the worker log."""

    failed: bool = False


class DemoError(Exception):
    """The demo could not run. The message names what failed and how to fix it."""


@dataclasses.dataclass
class Services:
    """The broker and MongoDB server of one run, and whether the demo started them."""

    broker_url: str
    broker_embedded: bool
    mongodb_uri: str
    mongodb_embedded: bool
    database: str
    workdir: str


# -- services ---------------------------------------------------------------


def _start_services(cleanup: contextlib.ExitStack) -> Services:
    """Choose or start the broker and MongoDB server and export their settings."""
    workdir = tempfile.mkdtemp(prefix="partner-sync-demo-")
    cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)

    broker_url = os.environ.get(BROKER_URL_VARIABLE, "")
    broker_embedded = not broker_url
    if broker_embedded:
        broker_url = "filesystem://"
        broker_folder = os.path.join(workdir, "broker")
        for sub in ("queue", "control"):
            os.makedirs(os.path.join(broker_folder, sub))
        os.environ[BROKER_FOLDER_VARIABLE] = broker_folder

    mongodb_uri = os.environ.get(MONGODB_URI_VARIABLE, "")
    mongodb_embedded = False
    if not mongodb_uri:
        server = MongoTestServer(startup_timeout=30.0)
        cleanup.callback(server.stop)
        try:
            mongodb_uri = server.start()
        except RuntimeError as exc:
            raise DemoError(str(exc)) from exc
        # MongoTestServer uses TASKTRACKER_TEST_MONGODB_URI instead of
        # starting a server when that variable is set.
        mongodb_embedded = server.process is not None

    # A fresh database per run, so records of an earlier run never
    # deduplicate or skip the sends of this one.
    database = f"partner_sync_demo_{uuid.uuid4().hex[:8]}"
    os.environ[BROKER_URL_VARIABLE] = broker_url
    os.environ[MONGODB_URI_VARIABLE] = mongodb_uri
    os.environ[DATABASE_VARIABLE] = database
    return Services(broker_url, broker_embedded, mongodb_uri, mongodb_embedded,
                    database, workdir)


def _describe(services: Services) -> str:
    if services.broker_embedded:
        broker = f"filesystem:// in {os.environ[BROKER_FOLDER_VARIABLE]} (embedded)"
    else:
        broker = maybe_sanitize_url(services.broker_url)
    mongodb = f"{mask_uri(services.mongodb_uri)}, database {services.database}"
    if services.mongodb_embedded:
        mongodb += " (embedded SecantusDB)"
    return f"  broker:  {broker}\n  MongoDB: {mongodb}"


def _check_broker(app: Celery) -> None:
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=2, interval_start=0.2)
    except (OperationalError, OSError) as exc:
        raise DemoError(
            f"broker {maybe_sanitize_url(app.conf.broker_url)} is not reachable ({exc}): "
            "start it or unset TASKTRACKER_DEMO_BROKER_URL to use the embedded broker"
        ) from exc


def _delete_queues(app: Celery, queues: Iterable[Queue]) -> None:
    # Messages left by an interrupted run would reference executions in
    # another database, so the demo starts and ends with empty queues.
    # Virtual transports such as Redis delete only the queues whose binding
    # this process declared, so each queue is declared before the delete.
    with app.connection_for_write() as connection:
        for queue in queues:
            channel = connection.channel()
            try:
                bound = queue.bind(channel)
                bound.declare()
                bound.delete()
            except connection.channel_errors as exc:
                print(f"    could not delete queue {queue.name}: {exc}", file=sys.stderr)
            finally:
                with contextlib.suppress(*connection.channel_errors):
                    channel.close()


def _count_messages(app: Celery, queue_name: str) -> int:
    with app.connection_for_read() as connection:
        queue = dlq_queue(queue_name).bind(connection.default_channel)
        declared = queue.queue_declare()
        return int(declared.message_count)


# -- worker -----------------------------------------------------------------


class WorkerProcess:
    """A prefork ``celery worker`` of the partner sync app, run as a child process."""

    def __init__(self, *, workdir: str, queue: str, concurrency: int = 2) -> None:
        self.name = f"partner-sync-demo-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        self.log_path = os.path.join(workdir, "worker.log")
        self.args = [
            sys.executable, "-m", "celery", "-A", APP_MODULE, "worker",
            "-P", "prefork", "-c", str(concurrency), "-Q", queue, "-n", self.name,
            "-E", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "INFO",
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float) -> float:
        """Start the worker, wait until it logs that it is ready and return the seconds taken."""
        started = time.monotonic()
        env = {**os.environ,
               "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # A session of its own, so stop() reaches the pool children too.
        self.process = subprocess.Popen(
            self.args, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        while " ready." not in self.output():
            if self.process.poll() is not None:
                raise DemoError(
                    f"worker exited with status {self.process.returncode} during start-up; "
                    "see the worker log below"
                )
            if time.monotonic() - started > timeout:
                raise DemoError(f"worker did not report ready within {timeout:.0f} s")
            time.sleep(0.1)
        return time.monotonic() - started

    def output(self) -> str:
        """Return the worker log so far."""
        if not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the worker with a warm shutdown, killing it after *timeout* seconds."""
        if self.process is not None and self.process.poll() is None:
            # SIGTERM to the main process only: it stops the pool children
            # itself, while a signal to the whole group makes them exit early.
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


# -- scenario ---------------------------------------------------------------


def _send_polls(
    tasks: ModuleType, partners: Sequence[str], window: str, times: int,
) -> tuple[int, int]:
    """Send the poll of each partner *times* times and return (sends, deduplicated sends)."""
    sends = deduplicated = 0
    for partner in partners:
        for _ in range(times):
            celery_task_id = str(uuid.uuid4())
            result = tasks.poll_partner_logs.apply_async(
                (partner, window), task_id=celery_task_id,
            )
            sends += 1
            deduplicated += result.id != celery_task_id
    return sends, deduplicated


def _send_webhooks(tasks: ModuleType) -> tuple[int, int]:
    """Send the sync task of each webhook log twice and return (sends, deduplicated sends)."""
    from .partner_sync.partner_api import FlightLogRef

    sends = deduplicated = 0
    for partner, aircraft_id, log_id in WEBHOOK_LOGS:
        for _ in range(2):
            sends += 1
            deduplicated += not tasks.schedule_sync(FlightLogRef(partner, aircraft_id, log_id))
    return sends, deduplicated


def _expected_task_ids(tasks: ModuleType, windows: Iterable[str]) -> tuple[set[str], set[str]]:
    """Return the taskIds of the polls and of the flight log syncs the scenario sends."""
    from .partner_sync.partner_api import CATALOG

    polls = {tasks.poll_partner_logs.build_task_key((partner, window)).task_id
             for partner in CATALOG for window in windows}
    syncs = {tasks.sync_flight_log.build_task_key((partner, log.aircraft_id, log.log_id)).task_id
             for partner, logs in CATALOG.items() for log in logs}
    return polls, syncs


def _wait_until_settled(
    collection: Collection[dict[str, Any]], task_ids: set[str], *, deadline: float, what: str,
) -> None:
    """Wait until each of *task_ids* has completed or been dead-lettered.

    The last execution of each taskId decides: a ``failed`` execution that
    will retry is followed by a new one, so it does not count as settled.
    """
    while True:
        records = list(collection.find({"taskId": {"$in": sorted(task_ids)}}, {"_id": 0}))
        latest = latest_executions(records)
        pending = sorted(task_id for task_id in task_ids
                         if latest.get(task_id, {}).get("status") not in SETTLED_STATUSES)
        if not pending:
            return
        if time.monotonic() > deadline:
            shown = ", ".join(
                f"{task_id} ({latest.get(task_id, {}).get('status', 'no record')})"
                for task_id in pending[:5]
            )
            raise DemoError(
                f"timed out waiting for {what}: {len(pending)} taskIds not settled, "
                f"e.g. {shown}; rerun with a larger --timeout if the machine is busy"
            )
        time.sleep(POLL_INTERVAL)


def _run(
    services: Services,
    cleanup: contextlib.ExitStack,
    options: argparse.Namespace,
    status: RunStatus,
) -> int:
    # The app and task modules read the environment at import, so they are
    # imported only after _start_services() has set it.
    from .partner_sync import storage, tasks
    from .partner_sync.celery_app import app
    from .partner_sync.partner_api import CATALOG

    tracker = celery_tasktracker.get_tracker(app)
    cleanup.callback(tracker.reset)
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        services.mongodb_uri, tz_aware=True)
    cleanup.callback(client.close)
    database = client[services.database]
    if not (services.mongodb_embedded or options.keep):
        cleanup.callback(client.drop_database, services.database)

    dlq_name = tracker.dlq_name(QUEUE)
    _check_broker(app)
    if not services.broker_embedded:
        queues = [app.amqp.queues[QUEUE], dlq_queue(dlq_name)]
        _delete_queues(app, queues)
        if not options.keep:
            cleanup.callback(_delete_queues, app, queues)

    partners = sorted(CATALOG)
    poll_ids, sync_ids = _expected_task_ids(tasks, [FIRST_WINDOW, SECOND_WINDOW])
    first_poll_ids = {tasks.poll_partner_logs.build_task_key((partner, FIRST_WINDOW)).task_id
                      for partner in partners}

    # The first polls are queued before any worker runs, so the second send
    # of each finds the first one queued.
    sends, deduplicated = _send_polls(tasks, partners, FIRST_WINDOW, times=2)
    print(f"[1] scheduler fired twice for window {FIRST_WINDOW}: {sends} poll sends, "
          f"{deduplicated} deduplicated")

    worker = WorkerProcess(workdir=services.workdir, queue=QUEUE)
    cleanup.callback(_print_worker_log_on_error, worker, status)
    cleanup.callback(worker.stop)
    started = time.monotonic()
    seconds = worker.start(timeout=60.0)
    print(f"[2] started worker {worker.name} (prefork, 2 processes) in {seconds:.1f} s")
    deadline = time.monotonic() + options.timeout

    _wait_until_settled(database[tracker.config.collection], first_poll_ids,
                        deadline=deadline, what="the first polls")
    print(f"[3] first polls completed; their sync tasks wait {tasks.SYNC_SETTLE_SECONDS:.0f} s "
          "before fetching")

    # The first polls' sync tasks stay queued for SYNC_SETTLE_SECONDS after
    # they were sent. Both bursts below must reach the tracker before then,
    # because a send of a log whose sync already completed starts a new
    # execution, which the report flags as a second run.
    sends, deduplicated = _send_webhooks(tasks)
    print(f"[4] partner webhooks announced {len(WEBHOOK_LOGS)} logs twice each: {sends} sends, "
          f"{deduplicated} deduplicated")
    sends, deduplicated = _send_polls(tasks, partners, SECOND_WINDOW, times=1)
    print(f"[5] scheduler fired for window {SECOND_WINDOW}: {sends} poll sends, "
          f"{deduplicated} deduplicated")

    _wait_until_settled(database[tracker.config.collection], poll_ids | sync_ids,
                        deadline=deadline, what="all tasks to complete or be dead-lettered")
    print(f"[6] every task completed or was dead-lettered "
          f"{time.monotonic() - started:.1f} s after the worker started")

    report = build_report(
        records=list(database[tracker.config.collection].find({}, {"_id": 0})),
        flight_logs=list(database[storage.FLIGHT_LOGS].find({})),
        api_requests=list(database[storage.API_REQUESTS].find({}, {"_id": 0})),
        expected_task_ids=poll_ids | sync_ids,
        dlq_messages=_count_messages(app, dlq_name),
        dlq_name=dlq_name,
        history=tracker.history,
    )
    print()
    print(render_report(report))
    if options.keep:
        _print_kept(services, [QUEUE, dlq_name])
    status.failed = not report.ok
    return 0 if report.ok else 1


def _print_kept(services: Services, queue_names: Sequence[str]) -> None:
    kept = []
    if not services.mongodb_embedded:
        kept.append(f"database {services.database} on {mask_uri(services.mongodb_uri)}")
    if not services.broker_embedded:
        kept.append(f"queues {', '.join(queue_names)} on "
                    f"{maybe_sanitize_url(services.broker_url)}")
    if kept:
        print("\nKept for inspection: " + "; ".join(kept) + ".")


def _print_worker_log_on_error(worker: WorkerProcess, status: RunStatus) -> None:
    if status.failed:
        tail = worker.output()[-4000:]
        print(f"\nLast lines of the worker log:\n{tail}", file=sys.stderr)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m example_project.demo",
        description="Run the partner sync example with a real prefork worker and print "
                    "what celery_tasktracker deduplicated, retried and dead-lettered.",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0,
        help="seconds to wait for all tasks to settle after the worker started (default 120)",
    )
    parser.add_argument(
        "--keep", action="store_true",
        help="keep the MongoDB database and the broker queues of an external MongoDB "
             "server or broker after the run, for inspection; embedded ones always go",
    )
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds the ExitStack in main(), so a terminated demo still
    # stops its worker and MongoDB server. Python's default action for
    # SIGTERM ends the process without running any clean-up.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return 0 when every check passed, else 1."""
    options = _parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    status = RunStatus()
    started = time.monotonic()
    with contextlib.ExitStack() as cleanup:
        try:
            services = _start_services(cleanup)
            print("Partner sync demo")
            print(_describe(services))
            exit_code = _run(services, cleanup, options, status)
        except DemoError as exc:
            status.failed = True
            print(f"demo failed: {exc}", file=sys.stderr)
            exit_code = 1
    print(f"\nTotal run time {time.monotonic() - started:.1f} s, including start-up and "
          "shutdown.")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
