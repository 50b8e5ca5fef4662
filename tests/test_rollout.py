"""Rolling tracking out: observe mode, per-queue enablement, mixed fleets, rollback."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest
from celery import Celery
from pymongo import monitoring

from celery_tasktracker import get_tracker, operations
from tests.app import make_app
from tests.harness import BROKERS, delete_queues, running_workers, unique_name, wait_for

pytestmark = pytest.mark.worker


class CommandCounter(monitoring.CommandListener):
    """Counts the commands sent to the MongoDB test server by this process."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.commands.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


COUNTER = CommandCounter()
# Registered once: it applies to every client created after this line.
monitoring.register(COUNTER)


@pytest.fixture
def settings(mongodb_uri: str, mongo_client: pymongo.MongoClient) -> Iterator[dict[str, Any]]:
    database = unique_name("ttr").replace("-", "_")
    values = {"broker_url": BROKERS["redis"], "mongodb_uri": mongodb_uri,
              "database": database, "queue": unique_name("ttq")}
    yield values
    delete_queues(BROKERS["redis"], [values["queue"], f"{values['queue']}.dlq"])
    mongo_client.drop_database(database)


def runs(mongo_client: pymongo.MongoClient, settings: dict[str, Any], key: str) -> int:
    return mongo_client[settings["database"]].body_runs.count_documents({"key": key})


def records(app: Celery, **query: Any) -> list[dict]:
    return list(get_tracker(app).store.collection.find(query, {"_id": 0}))


def worker_env(**conf: Any) -> dict[str, str]:
    return {"TT_EXTRA_CONF": json.dumps(conf)}


def republish(app: Celery, celery_task_id: str, user: str) -> None:
    """Publish a copy of a sent message: same celery task id, same tracking header."""
    record = get_tracker(app).store.find_by_celery_id(celery_task_id)
    app.send_task("tests.notify", args=(user,), task_id=celery_task_id, headers={
        "tasktracker": {"v": 1, "taskId": record["taskId"],
                        "executionId": record["executionId"], "attempt": 0}})


def test_observe_mode_runs_duplicate_sends(
    settings: dict[str, Any], mongo_client: pymongo.MongoClient,
) -> None:
    app = make_app(**settings, extra_conf={"tasktracker_mode": "observe"})
    user = uuid.uuid4().hex
    notify = app.tasks["tests.notify"]

    with running_workers(1, env=worker_env(tasktracker_mode="observe"), **settings):
        first = notify.delay(user, seconds=1)
        second = notify.delay(user, seconds=1)
        wait_for(lambda: runs(mongo_client, settings, f"notify:{user}:email") == 2,
                 message="both sends to run")

    holder = get_tracker(app).store.find_by_celery_id(first.id)
    observed = get_tracker(app).store.find_by_celery_id(second.id)
    assert second.id != first.id
    assert holder["wouldDeduplicateSends"] == 1
    assert "deduplicatedSends" not in holder
    assert observed["wouldDeduplicate"] is True
    assert observed["observedDuplicateOf"] == holder["executionId"]
    assert observed["taskId"] == holder["taskId"]
    counts = operations.stats(get_tracker(app)).by_queue[settings["queue"]]
    assert counts.would_deduplicate_sends == 1
    assert counts.deduplicated_sends == 0


def test_observe_mode_runs_duplicate_deliveries(
    settings: dict[str, Any], mongo_client: pymongo.MongoClient,
) -> None:
    app = make_app(**settings, extra_conf={"tasktracker_mode": "observe"})
    user = uuid.uuid4().hex

    with running_workers(1, env=worker_env(tasktracker_mode="observe"), **settings):
        sent = app.tasks["tests.notify"].delay(user)
        wait_for(lambda: runs(mongo_client, settings, f"notify:{user}:email") == 1,
                 message="the first delivery to run")
        republish(app, sent.id, user)
        wait_for(lambda: runs(mongo_client, settings, f"notify:{user}:email") == 2,
                 message="the copy to run")

    original = records(app, celeryTaskId=sent.id, wouldSkip={"$exists": False})
    skipped = records(app, celeryTaskId=sent.id, wouldSkip=True)
    assert original[0]["wouldSkipDeliveries"] == 1
    assert "duplicateDeliveries" not in original[0]
    assert len(skipped) == 1
    assert skipped[0]["observedSkipOf"] == original[0]["executionId"]
    assert skipped[0]["status"] == "completed"
    counts = operations.stats(get_tracker(app)).by_queue[settings["queue"]]
    assert counts.would_skip_deliveries == 1
    assert counts.duplicate_deliveries == 0


def test_switching_to_enforce_deduplicates(
    settings: dict[str, Any], mongo_client: pymongo.MongoClient,
) -> None:
    app = make_app(**settings, extra_conf={"tasktracker_mode": "observe"})
    notify = app.tasks["tests.notify"]
    observed_user, enforced_user = uuid.uuid4().hex, uuid.uuid4().hex
    observed = [notify.delay(observed_user), notify.delay(observed_user)]

    app.conf.tasktracker_mode = "enforce"
    get_tracker(app).reset()
    enforced = [notify.delay(enforced_user), notify.delay(enforced_user)]
    with running_workers(1, **settings):
        wait_for(lambda: runs(mongo_client, settings, f"notify:{enforced_user}:email") == 1
                 and runs(mongo_client, settings, f"notify:{observed_user}:email") == 2,
                 message="the tasks to run")

    assert observed[0].id != observed[1].id
    assert enforced[0].id == enforced[1].id
    assert runs(mongo_client, settings, f"notify:{enforced_user}:email") == 1


def test_untracked_queue_makes_no_store_round_trip(settings: dict[str, Any]) -> None:
    tracked_queue = settings["queue"]
    other_queue = unique_name("ttq-plain")
    app = make_app(**settings, extra_conf={"tasktracker_queues": [tracked_queue]})
    notify = app.tasks["tests.notify"]
    notify.delay("warm-up")  # creates the client and the indexes
    before = len(COUNTER.commands)

    notify.apply_async(("u1",), queue=other_queue)
    untracked = len(COUNTER.commands) - before
    notify.apply_async(("u2",), queue=tracked_queue)
    tracked = len(COUNTER.commands) - before - untracked

    delete_queues(BROKERS["redis"], [other_queue])
    assert untracked == 0
    assert tracked >= 1
    assert [r["queue"] for r in records(app)] == [tracked_queue, tracked_queue]


def test_untracked_task_name_behaves_as_plain(
    settings: dict[str, Any], mongo_client: pymongo.MongoClient,
) -> None:
    conf = {"tasktracker_tasks": ["tests.double"]}
    app = make_app(**settings, extra_conf=conf)
    user = uuid.uuid4().hex

    with running_workers(1, env=worker_env(**conf), **settings):
        app.tasks["tests.notify"].delay(user)
        app.tasks["tests.notify"].delay(user)
        app.tasks["tests.double"].delay(user, 2)
        wait_for(lambda: runs(mongo_client, settings, f"notify:{user}:email") == 2
                 and runs(mongo_client, settings, user) == 1, message="the tasks to run")

    assert [r["taskName"] for r in records(app)] == ["tests.double"]


def test_plain_worker_runs_tracked_messages(
    settings: dict[str, Any], mongo_client: pymongo.MongoClient,
) -> None:
    app = make_app(**settings)
    user = uuid.uuid4().hex
    app.tasks["tests.notify"].delay(user)

    with running_workers(1, app_module="tests.plain_worker_app", **settings):
        wait_for(lambda: runs(mongo_client, settings, f"notify:{user}:email") == 1,
                 message="the plain worker to run the tracked message")


def test_disabled_extension_runs_queued_and_dead_lettered(
    settings: dict[str, Any], mongo_client: pymongo.MongoClient,
) -> None:
    app = make_app(**settings)
    bad, queued_user = uuid.uuid4().hex, uuid.uuid4().hex
    failed = app.tasks["tests.reject_input"].delay(bad, {"x": 1})
    with running_workers(1, **settings):
        wait_for(lambda: (r := get_tracker(app).store.find_by_celery_id(failed.id))
                 and r["status"] == "dlq", message="the task to be dead-lettered")
    app.tasks["tests.notify"].delay(queued_user)

    dlq = f"{settings['queue']}.dlq"
    with running_workers(1, env=worker_env(tasktracker_enabled=False),
                         extra_queues=(dlq,), **settings):
        wait_for(lambda: runs(mongo_client, settings, f"notify:{queued_user}:email") == 1
                 and runs(mongo_client, settings, bad) == 2,
                 message="the queued and the dead-lettered message to run")

    assert records(app, celeryTaskId=failed.id)[0]["status"] == "dlq"
    assert get_tracker(app).store.history(records(app, celeryTaskId=failed.id)[0]["taskId"])


def test_plain_worker_runs_dead_lettered_messages(
    settings: dict[str, Any], mongo_client: pymongo.MongoClient,
) -> None:
    app = make_app(**settings)
    bad = uuid.uuid4().hex
    failed = app.tasks["tests.reject_input"].delay(bad, {"x": 1})
    with running_workers(1, **settings):
        wait_for(lambda: (r := get_tracker(app).store.find_by_celery_id(failed.id))
                 and r["status"] == "dlq", message="the task to be dead-lettered")

    dlq = f"{settings['queue']}.dlq"
    with running_workers(1, app_module="tests.plain_worker_app", extra_queues=(dlq,),
                         **settings):
        wait_for(lambda: runs(mongo_client, settings, bad) == 2,
                 message="the plain worker to run the dead-lettered message")
