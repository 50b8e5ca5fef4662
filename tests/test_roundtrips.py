"""Store round trips per task lifecycle, counted with pymongo command monitoring.

An in-process solo worker consumes the queue in its own thread, so each
command is attributed to the producer (the test's main thread) or to the
worker. These are counts, not timings: a change that adds a round trip to a
lifecycle fails here.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import types
import uuid
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest
from celery import Celery, group
from celery.contrib.testing.worker import start_worker
from celery.signals import before_task_publish
from celery.worker import state as worker_state

import celery_tasktracker
from celery_tasktracker import get_tracker, send_group
from celery_tasktracker.monitoring import LeaseRenewal
from celery_tasktracker.testing import StoreCommandCounter, count_by_side
from tests.app import make_app
from tests.harness import BROKERS, delete_queues, unique_name, wait_for

pytestmark = pytest.mark.worker

Counts = collections.Counter[str]


@dataclasses.dataclass
class Setup:
    app: Celery
    queue: str
    counter: StoreCommandCounter
    records: pymongo.collection.Collection

    def record(self, celery_task_id: str) -> dict[str, Any]:
        found = self.records.find_one({"celeryTaskId": celery_task_id},
                                      sort=[("createdAt", -1)])
        return found or {}

    def wait_status(self, celery_task_id: str, status: str) -> None:
        wait_for(lambda: self.record(celery_task_id).get("status") == status,
                 message=f"{celery_task_id} to be {status}")

    def counts(self) -> tuple[Counts, Counts]:
        """Return the producer's and the worker's commands since the last call."""
        # The worker writes the outcome right after the state that was waited for.
        time.sleep(0.3)
        return count_by_side(self.counter.take())


@pytest.fixture(scope="module")
def setup(mongodb_uri: str, mongo_client: pymongo.MongoClient) -> Iterator[Setup]:
    database = unique_name("ttr").replace("-", "_")
    queue = unique_name("ttrq")
    counter = StoreCommandCounter()
    app = make_app(broker_url=BROKERS["redis"], mongodb_uri=mongodb_uri, database=database,
                   queue=queue)
    celery_tasktracker.install(app, event_listeners=[counter])
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING",
                      shutdown_timeout=30):
        setup = Setup(app, queue, counter, mongo_client[database]["task_tracker"])
        # A first task, so that start-up work does not count in any test.
        result = app.tasks["tests.notify"].delay("warm-up")
        setup.wait_status(result.id, "completed")
        setup.counts()
        yield setup
    delete_queues(BROKERS["redis"], [queue, f"{queue}.dlq"])
    mongo_client.drop_database(database)


def key() -> str:
    return uuid.uuid4().hex[:12]


def test_success_three_round_trips(setup: Setup) -> None:
    result = setup.app.tasks["tests.notify"].delay(key())
    setup.wait_status(result.id, "completed")

    producer, worker = setup.counts()

    assert producer == {"insert": 1}
    assert worker == {"claim": 1, "record success": 1}


def test_retry_once_six_round_trips(setup: Setup) -> None:
    result = setup.app.tasks["tests.flaky"].delay(key(), 1)
    wait_for(lambda: setup.records.count_documents(
        {"celeryTaskId": result.id, "status": "completed"}), message="the retried task")

    producer, worker = setup.counts()

    assert producer == {"insert": 1}
    assert worker == {"claim": 2, "record failed": 1, "insert": 1, "record success": 1}


def test_deduplicated_send_two_round_trips(setup: Setup) -> None:
    notify = setup.app.tasks["tests.notify"]
    user = key()
    first = notify.delay(user, seconds=1.0)
    setup.wait_status(first.id, "processing")
    setup.counts()

    second = notify.delay(user, seconds=1.0)
    producer, worker = setup.counts()
    setup.wait_status(first.id, "completed")
    setup.counts()

    assert second.id == first.id
    assert producer == {"insert": 1, "find and count duplicate send": 1}
    assert worker == {}


def test_duplicate_delivery_three_round_trips(setup: Setup) -> None:
    published: list[dict[str, Any]] = []

    def capture(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
        published.append(dict(headers or {}))

    user = key()
    before_task_publish.connect(capture, weak=False)
    try:
        result = setup.app.tasks["tests.notify"].delay(user)
    finally:
        before_task_publish.disconnect(capture)
    setup.wait_status(result.id, "completed")
    setup.counts()

    headers = published[-1]
    setup.app.send_task(headers["task"], args=(user,), task_id=headers["id"],
                        queue=setup.queue, headers={"tasktracker": headers["tasktracker"]})
    wait_for(lambda: setup.record(result.id).get("duplicateDeliveries") == 1,
             message="the duplicate delivery to be skipped")
    producer, worker = setup.counts()

    assert producer == {}
    assert worker == {"claim": 1, "read record": 1, "count duplicateDeliveries": 1}


def test_dead_lettered_task_three_round_trips(setup: Setup) -> None:
    result = setup.app.tasks["tests.reject_input"].delay(key(), {"size": "large"})
    setup.wait_status(result.id, "dlq")

    producer, worker = setup.counts()

    assert producer == {"insert": 1}
    assert worker == {"claim": 1, "record dlq": 1}


def test_group_apply_async_inserts_each_member(setup: Setup) -> None:
    double = setup.app.tasks["tests.double"]
    name = key()

    result = group(double.s(name, value) for value in range(5)).apply_async()
    for member in result.results:
        setup.wait_status(member.id, "completed")
    producer, worker = setup.counts()

    assert producer == {"insert": 5}
    assert worker == {"claim": 5, "record success": 5}


def test_send_group_one_insert(setup: Setup) -> None:
    double = setup.app.tasks["tests.double"]
    name = key()

    result = send_group(group(double.s(name, value) for value in range(5)))
    for member in result.results:
        setup.wait_status(member.id, "completed")
    producer, worker = setup.counts()

    assert producer == {"insert 5 documents": 1}
    assert worker == {"claim": 5, "record success": 5}
    assert all(setup.record(member.id)["active"] is False for member in result.results)


class FakeRequest:
    """The part of a worker request that lease renewal reads."""

    def __init__(self, celery_task_id: str) -> None:
        self.id = celery_task_id


def test_lease_renewal_one_write(setup: Setup) -> None:
    requests = [FakeRequest(f"renewal-{index}") for index in range(25)]
    worker = types.SimpleNamespace(app=setup.app, hostname="renewal@test")
    renewal = LeaseRenewal(worker)
    setup.counts()

    worker_state.active_requests.update(requests)
    try:
        renewal.renew(worker)
    finally:
        worker_state.active_requests.difference_update(requests)
    producer, _worker = setup.counts()

    assert producer == {"renew leases": 1}


def test_listeners_added_after_first_use(setup: Setup) -> None:
    late = StoreCommandCounter()
    store = get_tracker(setup.app).store
    store.collection.find_one({})
    setup.counts()

    celery_tasktracker.install(setup.app, event_listeners=[late])
    store.collection.find_one({})

    assert [label for _thread, label, _command in late.take()] == ["read record"]
    setup.counts()
