"""Inspect commands, worker counters and signal safety on a real worker."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest
from celery import Celery

from celery_tasktracker import get_tracker, install, signals
from tests.app import make_app
from tests.harness import (
    BROKERS,
    ROOT,
    WorkerProcess,
    delete_queues,
    running_workers,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.worker


@pytest.fixture(scope="module")
def worker_setup(
    mongodb_uri: str, mongo_client: pymongo.MongoClient,
) -> Iterator[tuple[Celery, WorkerProcess, dict[str, str]]]:
    database = unique_name("ttm").replace("-", "_")
    settings = {"broker_url": BROKERS["redis"], "mongodb_uri": mongodb_uri,
                "database": database, "queue": unique_name("ttq")}
    with running_workers(1, env={"TT_FAULTY_RECEIVER": "1"}, **settings) as workers:
        yield make_app(**settings), workers[0], {**settings, "worker_name": workers[0].name}
    delete_queues(BROKERS["redis"], [settings["queue"], workers[0].private_queue])
    mongo_client.drop_database(database)


def celery_cli(settings: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TT_BROKER_URL": settings["broker_url"],
           "TT_MONGODB_URI": settings["mongodb_uri"], "TT_DATABASE": settings["database"],
           "TT_QUEUE": settings["queue"], "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.worker_app", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )


def inspect_json(settings: dict[str, str], command: str) -> dict[str, Any]:
    # Other workers may share the broker, so ask only this module's worker.
    destination = f"{settings['worker_name']}@{socket.gethostname()}"
    result = celery_cli(settings, "inspect", command, "--json", "--timeout", "5",
                        "--destination", destination)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_inspect_active_lists_running_execution(
    worker_setup: tuple[Celery, WorkerProcess, dict[str, str]],
) -> None:
    app, _worker, settings = worker_setup
    user = uuid.uuid4().hex
    result = app.tasks["tests.notify"].delay(user, seconds=6)
    store = get_tracker(app).store
    wait_for(lambda: (r := store.find_by_celery_id(result.id)) and r["status"] == "processing",
             message="the task to start")

    replies = inspect_json(settings, "tasktracker_active")

    rows = [row for reply in replies.values() for row in reply]
    record = store.find_by_celery_id(result.id)
    assert [row["celeryTaskId"] for row in rows] == [result.id]
    assert rows[0]["taskId"] == record["taskId"]
    assert rows[0]["executionId"] == record["executionId"]
    assert rows[0]["attempt"] == 0
    assert rows[0]["leaseExpiresAt"] is not None
    assert rows[0]["startedAt"] is not None
    # Let the task finish so later tests see an idle worker.
    wait_for(lambda: store.find_by_celery_id(result.id)["status"] == "completed",
             message="the task to complete")


def test_inspect_counters_count_claims_and_skips(
    worker_setup: tuple[Celery, WorkerProcess, dict[str, str]],
) -> None:
    app, _worker, settings = worker_setup
    before = next(iter(inspect_json(settings, "tasktracker_counters").values()))
    user = uuid.uuid4().hex
    store = get_tracker(app).store

    app.tasks["tests.notify"].delay(user)
    app.send_task("tests.notify", args=(user,))
    sent = app.tasks["tests.notify"].build_task_key((user,)).task_id
    wait_for(lambda: store.history(sent) and store.history(sent)[0]["status"] == "completed",
             message="the task to complete")
    wait_for(lambda: next(iter(inspect_json(settings, "tasktracker_counters").values()))
             ["skipped_duplicates"] > before["skipped_duplicates"], message="the skip")

    after = next(iter(inspect_json(settings, "tasktracker_counters").values()))
    assert after["claimed"] == before["claimed"] + 1
    assert after["completed"] == before["completed"] + 1
    assert after["skipped_duplicates"] == before["skipped_duplicates"] + 1


def test_raising_receiver_does_not_break_task(
    worker_setup: tuple[Celery, WorkerProcess, dict[str, str]],
) -> None:
    app, worker, _settings = worker_setup
    user = uuid.uuid4().hex

    result = app.tasks["tests.notify"].delay(user)
    wait_for(lambda: (r := get_tracker(app).store.find_by_celery_id(result.id))
             and r["status"] == "completed", message="the task to complete")

    output = worker.output()
    task_id = get_tracker(app).store.find_by_celery_id(result.id)["taskId"]
    assert f"faulty receiver for taskId={task_id}" in output
    assert "raised for taskId=" in output


def test_raising_receiver_does_not_break_send(
    make_tracked_app: Any, database: str, caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_tracked_app(database=database)
    notify = app.tasks["tests.notify"]

    def faulty(sender: object, **kwargs: object) -> None:
        raise RuntimeError("receiver failed")

    signals.task_deduplicated.connect(faulty)
    try:
        first = notify.delay(1)
        with caplog.at_level(logging.ERROR):
            second = notify.delay(1)
    finally:
        signals.task_deduplicated.disconnect(faulty)

    assert second.id == first.id
    assert "receiver failed" in caplog.text


def test_signals_carry_ids(make_tracked_app: Any, database: str) -> None:
    app = make_tracked_app(database=database)
    notify = app.tasks["tests.notify"]
    seen: list[dict[str, Any]] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        seen.append(kwargs)

    signals.task_deduplicated.connect(receiver)
    try:
        first = notify.delay(2)
        notify.delay(2)
    finally:
        signals.task_deduplicated.disconnect(receiver)

    record = get_tracker(app).store.find_by_celery_id(first.id)
    assert seen == [{"task_id": record["taskId"], "execution_id": record["executionId"],
                     "celery_task_id": first.id, "status": "queued"}]


def test_dlq_queues_listed_but_not_consumed(mongodb_uri: str, database: str) -> None:
    queue = unique_name("ttq")
    app = Celery("dlq-listing", broker=BROKERS["redis"], set_as_current=False)
    app.conf.update(task_default_queue=queue, tasktracker_mongodb_uri=mongodb_uri,
                    tasktracker_database=database, tasktracker_dlq_in_task_queues=True)
    install(app)

    app.finalize()

    assert f"{queue}.dlq" in {q.name for q in app.conf.task_queues}
    assert f"{queue}.dlq" in app.amqp.queues
    assert f"{queue}.dlq" not in app.amqp.queues.consume_from
    assert queue in app.amqp.queues.consume_from
