"""Dedup at send on a real broker and the MongoDB test server, no worker running."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

import pymongo
import pytest
from celery import Celery, group

from celery_tasktracker import DuplicateTaskError, StoreUnavailableError, get_tracker
from celery_tasktracker.testing import free_port
from tests.app import make_app
from tests.harness import BROKERS, unique_name

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def records(app: Celery, **query: Any) -> list[dict]:
    return list(get_tracker(app).store.collection.find(query, {"_id": 0}))


def _send_from_process(settings: dict[str, str], barrier: Any, results: Any) -> None:
    app = make_app(**settings)
    barrier.wait(timeout=60)
    result = app.tasks["tests.notify"].delay(4242, "sms")
    results.put(result.id)


def test_concurrent_sends_from_eight_processes_queue_one(
    mongodb_uri: str, database: str,
) -> None:
    settings = {"broker_url": BROKERS["redis"], "mongodb_uri": mongodb_uri,
                "database": database, "queue": unique_name("ttq")}
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(8)
    results = context.Queue()
    processes = [context.Process(target=_send_from_process, args=(settings, barrier, results))
                 for _ in range(8)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    celery_ids = [results.get(timeout=5) for _ in processes]
    app = make_app(**settings)

    stored = records(app, taskName="tests.notify")

    assert all(process.exitcode == 0 for process in processes)
    assert len(stored) == 1
    assert set(celery_ids) == {stored[0]["celeryTaskId"]}
    assert stored[0]["deduplicatedSends"] == 7


def test_second_send_while_queued_returns_existing(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app = make_tracked_app(database=database)
    notify = app.tasks["tests.notify"]

    first = notify.delay(7)
    second = notify.apply_async(kwargs={"user_id": 7, "channel": "email"})

    assert second.id == first.id
    assert len(records(app)) == 1
    assert records(app)[0]["status"] == "queued"


def test_other_arguments_are_not_duplicates(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app = make_tracked_app(database=database)
    notify = app.tasks["tests.notify"]

    first = notify.delay(7)
    second = notify.delay(7, "sms")

    assert second.id != first.id
    assert len(records(app)) == 2


def test_raise_policy_names_active_execution(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app = make_tracked_app(database=database)
    app.conf.tasktracker_duplicate_policy = "raise"
    notify = app.tasks["tests.notify"]
    first = notify.delay(8)

    with pytest.raises(DuplicateTaskError) as info:
        notify.delay(8)

    assert info.value.celery_task_id == first.id
    assert info.value.execution_id == records(app)[0]["executionId"]
    assert info.value.task_id == records(app)[0]["taskId"]
    assert "tasktracker_force=True" in str(info.value)


def test_force_sends_new_execution(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app = make_tracked_app(database=database)
    notify = app.tasks["tests.notify"]
    first = notify.delay(9)

    forced = notify.apply_async((9,), tasktracker_force=True)

    assert forced.id != first.id
    stored = {d["celeryTaskId"]: d for d in records(app)}
    assert stored[forced.id]["forced"] is True
    assert stored[forced.id]["active"] is False
    assert stored[first.id]["active"] is True


def test_send_task_records_and_marks_duplicate(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app = make_tracked_app(database=database)
    seen: list[dict] = []

    from celery.signals import before_task_publish

    def capture(headers: dict | None = None, **kwargs: Any) -> None:
        seen.append(dict((headers or {}).get("tasktracker") or {}))

    before_task_publish.connect(capture, weak=False)
    try:
        app.send_task("tests.notify", args=(11,))
        app.send_task("tests.notify", kwargs={"user_id": 11})
    finally:
        before_task_publish.disconnect(capture)

    stored = records(app)
    assert len(stored) == 1
    assert seen[0]["executionId"] == stored[0]["executionId"]
    assert seen[1]["duplicateOf"] == stored[0]["executionId"]


def test_group_members_are_not_deduplicated(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app = make_tracked_app(database=database)
    double = app.tasks["tests.double"]

    group(double.s("g", 1), double.s("g", 1)).apply_async()

    stored = records(app)
    assert len(stored) == 2
    assert {d["active"] for d in stored} == {False}


def test_failed_publish_releases_key(mongodb_uri: str, database: str) -> None:
    app = make_app(broker_url=f"redis://127.0.0.1:{free_port()}/0", mongodb_uri=mongodb_uri,
                   database=database, queue=unique_name("ttq"))
    app.conf.broker_connection_retry = False
    app.conf.task_publish_retry = False
    notify = app.tasks["tests.notify"]

    with pytest.raises(Exception, match=r"(?i)connect"):
        notify.delay(12)

    stored = records(app)
    assert len(stored) == 1
    assert stored[0]["status"] == "failed"
    assert stored[0]["active"] is False
    assert stored[0]["errorMessage"].startswith("publish failed")


def test_unreachable_store_fails_send_by_default(database: str) -> None:
    app = make_app(broker_url=BROKERS["redis"], database=database, queue=unique_name("ttq"),
                   mongodb_uri=f"mongodb://127.0.0.1:{free_port()}")
    app.conf.tasktracker_mongodb_timeout = 0.3

    with pytest.raises(StoreUnavailableError, match=r"127\.0\.0\.1"):
        app.tasks["tests.notify"].delay(13)


def test_unreachable_store_sends_untracked_when_set(database: str) -> None:
    app = make_app(broker_url=BROKERS["redis"], database=database, queue=unique_name("ttq"),
                   mongodb_uri=f"mongodb://127.0.0.1:{free_port()}")
    app.conf.tasktracker_mongodb_timeout = 0.3
    app.conf.tasktracker_store_unavailable = "send_untracked"

    result = app.tasks["tests.notify"].delay(14)

    assert result.id
    _ = pymongo


def test_task_queue_attribute_recorded(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    from celery_tasktracker import TrackedTask
    from tests.harness import delete_queues

    app = make_tracked_app(database=database)
    queue = unique_name("ttq-attr")

    @app.task(shared=False, base=TrackedTask, name="tests.routed", queue=queue)
    def routed(number: int) -> int:
        return number

    try:
        routed.delay(1)
    finally:
        delete_queues(BROKERS["redis"], [queue])

    assert [d["queue"] for d in records(app)] == [queue]


def test_stored_arguments_are_redacted(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app = make_tracked_app(database=database)
    notify = app.tasks["tests.notify"]
    notify.tracking_store_args = True
    notify.tracking_redact_args = ("user_id",)
    try:
        result = notify.delay("alice@example.com", channel="sms")
    finally:
        notify.tracking_store_args = False
        notify.tracking_redact_args = ()

    record = get_tracker(app).store.find_by_celery_id(result.id)
    assert record["args"] == ["[redacted]"]
    assert record["kwargs"] == {"channel": "sms"}
    assert record["redactedArgs"] == ["user_id"]


def test_arguments_not_stored_by_default(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app = make_tracked_app(database=database)

    result = app.tasks["tests.notify"].delay("bob@example.com")

    record = get_tracker(app).store.find_by_celery_id(result.id)
    assert "args" not in record
    assert "kwargs" not in record


def test_send_task_countdown_extends_dedup_window(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app = make_tracked_app(database=database)

    sent = app.send_task("tests.notify", args=(31,), countdown=3600)

    record = get_tracker(app).store.find_by_celery_id(sent.id)
    window = (record["dedupExpiresAt"] - record["createdAt"]).total_seconds()
    assert window >= 3600 + 300 - 5
    assert record["notBefore"] > record["createdAt"]


def test_retry_supersedes_send_in_handover_gap(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    from celery_tasktracker.publish import TaskKey, build_document, register_send
    from celery_tasktracker.store.base import utcnow

    app = make_tracked_app(database=database)
    tracker = get_tracker(app)
    released_at = utcnow()
    intruder = build_document(key=TaskKey("ns:gap"), task_name="ns", celery_task_id="c-new",
                              queue="q", attempt=0, now=utcnow(), dedup_window=300)
    tracker.store.insert(intruder)
    retry = build_document(key=TaskKey("ns:gap"), task_name="ns", celery_task_id="c-old",
                           queue="q", attempt=1, now=utcnow(), dedup_window=300)

    outcome = register_send(tracker, retry, preempt_since=released_at)

    assert outcome.is_duplicate is False
    assert tracker.store.find_active("ns:gap")["executionId"] == retry["executionId"]
    assert tracker.store.get(intruder["executionId"])["superseded"] is True


def test_send_older_than_release_not_preempted(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    import datetime as dt

    from celery_tasktracker.publish import TaskKey, build_document, register_send
    from celery_tasktracker.store.base import utcnow

    app = make_tracked_app(database=database)
    tracker = get_tracker(app)
    holder = build_document(key=TaskKey("ns:old"), task_name="ns", celery_task_id="c-1",
                            queue="q", attempt=0, now=utcnow(), dedup_window=300)
    tracker.store.insert(holder)
    retry = build_document(key=TaskKey("ns:old"), task_name="ns", celery_task_id="c-2",
                           queue="q", attempt=1, now=utcnow(), dedup_window=300)

    outcome = register_send(tracker, retry,
                            preempt_since=utcnow() + dt.timedelta(seconds=1))

    assert outcome.is_duplicate is True
    assert outcome.existing["executionId"] == holder["executionId"]
