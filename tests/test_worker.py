"""The tracked lifecycle on real worker processes, on Redis and on RabbitMQ."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest
from celery import Celery, chord
from celery.signals import before_task_publish
from kombu import Connection

from celery_tasktracker import get_tracker
from celery_tasktracker.dlq import dlq_queue
from tests.app import make_app
from tests.harness import (
    BROKERS,
    RESULT_BACKEND,
    WorkerProcess,
    delete_queues,
    running_workers,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.worker


@dataclasses.dataclass
class Setup:
    app: Celery
    broker: str
    queue: str
    workers: list[WorkerProcess]
    mongo: pymongo.database.Database

    def history(self, task_id: str) -> list[dict]:
        return get_tracker(self.app).history(task_id)

    def record(self, celery_task_id: str) -> dict | None:
        return get_tracker(self.app).store.find_by_celery_id(celery_task_id)

    def runs(self, key: str) -> int:
        return self.mongo.body_runs.count_documents({"key": key})

    def wait_status(self, celery_task_id: str, status: str, timeout: float = 30) -> dict:
        return wait_for(
            lambda: (r := self.record(celery_task_id)) and r["status"] == status and r,
            timeout=timeout, message=f"{celery_task_id} to be {status}",
        )

    def wait_final(self, task_id: str, count: int, timeout: float = 45) -> list[dict]:
        def settled() -> list[dict] | None:
            chain = self.history(task_id)
            final = chain and chain[-1]["status"] in ("completed", "dlq")
            return chain if final and len(chain) == count else None

        return wait_for(settled, timeout=timeout, message=f"{count} executions of {task_id}")


@pytest.fixture(scope="module", params=["redis", "amqp"])
def setup(
    request: pytest.FixtureRequest, mongodb_uri: str, mongo_client: pymongo.MongoClient,
) -> Iterator[Setup]:
    broker = request.param
    database = unique_name("ttw").replace("-", "_")
    queue = unique_name("ttq")
    settings = {"broker_url": BROKERS[broker], "mongodb_uri": mongodb_uri,
                "database": database, "queue": queue}
    with running_workers(2, **settings) as workers:
        app = make_app(**settings)
        yield Setup(app, broker, queue, workers, mongo_client[database])
    queues = [queue, f"{queue}.dlq", *(w.private_queue for w in workers)]
    delete_queues(BROKERS[broker], queues)
    mongo_client.drop_database(database)


def key() -> str:
    return uuid.uuid4().hex[:12]


def published_header(send: Any) -> tuple[Any, dict]:
    """Call *send* and return its result and the message headers it published."""
    seen: list[dict] = []

    def capture(headers: dict | None = None, **kwargs: Any) -> None:
        seen.append(dict(headers or {}))

    before_task_publish.connect(capture, weak=False)
    try:
        result = send()
    finally:
        before_task_publish.disconnect(capture)
    return result, seen[-1]


def republish(app: Celery, headers: dict, args: tuple, kwargs: dict, queue: str) -> None:
    """Publish a copy of a message: same celery task id, same tracking header."""
    app.send_task(headers["task"], args=args, kwargs=kwargs, task_id=headers["id"],
                  queue=queue, headers={"tasktracker": headers["tasktracker"]})


def test_success_recorded_with_outcome(setup: Setup) -> None:
    user = key()

    result = setup.app.tasks["tests.notify"].delay(user)
    record = setup.wait_status(result.id, "completed")

    assert record["attempt"] == 0
    assert record["result"] == repr(f"sent email to {user}")
    assert record["runtimeMs"] >= 0
    assert record["worker"]["hostname"].startswith("w")
    assert record["active"] is False
    assert setup.runs(f"notify:{user}:email") == 1


def test_worker_computes_producer_task_id(setup: Setup) -> None:
    user = key()

    result = setup.app.tasks["tests.notify"].apply_async(kwargs={"user_id": user})
    record = setup.wait_status(result.id, "completed")
    run = setup.mongo.body_runs.find_one({"key": f"notify:{user}:email"})

    assert run["workerTaskId"] == record["taskId"]
    assert run["executionId"] == record["executionId"]


def test_send_while_running_deduplicated(setup: Setup) -> None:
    user = key()
    notify = setup.app.tasks["tests.notify"]
    first = notify.delay(user, seconds=2)
    setup.wait_status(first.id, "processing")

    second = notify.delay(user, seconds=2)
    record = setup.wait_status(first.id, "completed")

    assert second.id == first.id
    assert record["deduplicatedSends"] == 1
    assert setup.runs(f"notify:{user}:email") == 1


def test_send_during_retry_backoff_deduplicated(setup: Setup) -> None:
    name = key()
    backoff = setup.app.tasks["tests.backoff"]
    first = backoff.delay(name)
    task_id = wait_for(lambda: (r := setup.record(first.id)) and r["taskId"])
    wait_for(lambda: len(setup.history(task_id)) == 2, message="the retry to be queued")

    second = backoff.delay(name)
    chain = setup.wait_final(task_id, 2)

    assert second.id == first.id
    assert [d["status"] for d in chain] == ["failed", "completed"]
    assert chain[1]["deduplicatedSends"] == 1
    assert setup.runs(name) == 2


def test_message_delivered_to_two_workers_runs_once(setup: Setup) -> None:
    user = key()
    notify = setup.app.tasks["tests.notify"]
    first, private = setup.workers[0].private_queue, setup.workers[1].private_queue

    result, headers = published_header(
        lambda: notify.apply_async((user,), {"seconds": 1.5}, queue=first))
    republish(setup.app, headers, (user,), {"seconds": 1.5}, private)
    record = setup.wait_status(result.id, "completed")
    wait_for(lambda: setup.record(result.id).get("duplicateDeliveries") == 1,
             message="the duplicate delivery to be recorded")

    assert setup.runs(f"notify:{user}:email") == 1
    assert record["attempt"] == 0


def test_redelivery_after_success_not_run_again(setup: Setup) -> None:
    user = key()
    notify = setup.app.tasks["tests.notify"]
    result, headers = published_header(lambda: notify.delay(user))
    setup.wait_status(result.id, "completed")

    republish(setup.app, headers, (user,), {}, setup.queue)
    wait_for(lambda: setup.record(result.id).get("duplicateDeliveries") == 1,
             message="the redelivery to be skipped")

    assert setup.app.conf.result_backend is None
    assert setup.runs(f"notify:{user}:email") == 1
    assert setup.record(result.id)["status"] == "completed"


def test_send_task_twice_runs_once(setup: Setup) -> None:
    user = key()

    first = setup.app.send_task("tests.notify", args=(user,), kwargs={"seconds": 0.5})
    second = setup.app.send_task("tests.notify", kwargs={"user_id": user, "seconds": 0.5})
    setup.wait_status(first.id, "completed")
    wait_for(lambda: any(f"tests.notify[{second.id}] ignored" in w.output()
                         for w in setup.workers), message="the second message to be skipped")

    assert setup.runs(f"notify:{user}:email") == 1


def test_two_failures_then_success_chain(setup: Setup) -> None:
    name = key()

    result = setup.app.tasks["tests.flaky"].delay(name, 2)
    task_id = wait_for(lambda: (r := setup.record(result.id)) and r["taskId"])
    chain = setup.wait_final(task_id, 3)

    assert [d["attempt"] for d in chain] == [0, 1, 2]
    assert [d["status"] for d in chain] == ["failed", "failed", "completed"]
    assert [d.get("errorCategory") for d in chain[:2]] == ["transient", "transient"]
    assert chain[0]["errorType"] == "tests.app.TransientPartnerError"
    assert {d["celeryTaskId"] for d in chain} == {result.id}
    assert len({d["executionId"] for d in chain}) == 3
    assert chain[1]["retryOf"] == chain[0]["executionId"]
    assert chain[2]["retryOf"] == chain[1]["executionId"]
    assert setup.runs(name) == 3


@pytest.mark.parametrize(("task_name", "attempts"), [
    ("tests.explicit_retry", 3),
    ("tests.auto_retry", 3),
    ("tests.per_call_retry", 2),
    ("tests.flaky", 4),
])
def test_exhausted_retries_dead_lettered(setup: Setup, task_name: str, attempts: int) -> None:
    name = key()
    args = (name, 10) if task_name == "tests.flaky" else (name,)

    result = setup.app.tasks[task_name].delay(*args)
    task_id = wait_for(lambda: (r := setup.record(result.id)) and r["taskId"])
    chain = setup.wait_final(task_id, attempts)

    assert [d["status"] for d in chain] == ["failed"] * (attempts - 1) + ["dlq"]
    assert chain[-1]["dlqReason"] == "retries_exhausted"
    assert chain[-1]["dlqQueue"] == f"{setup.queue}.dlq"
    assert setup.runs(name) == attempts


def test_validation_error_dead_lettered_without_retry(setup: Setup) -> None:
    name = key()
    payload = {"altitude": "high", "log": name}

    result = setup.app.tasks["tests.reject_input"].delay(name, payload)
    record = setup.wait_status(result.id, "dlq")
    message = _read_dlq_message(setup, record["taskId"])

    assert record["errorCategory"] == "validation"
    assert record["dlqReason"] == "not_retryable"
    assert len(setup.history(record["taskId"])) == 1
    assert setup.runs(name) == 1
    assert message["args"] == [name, payload]
    header = message["headers"]["tasktracker"]
    assert header["executionId"] == record["executionId"]
    assert header["dlq"]["reason"] == "not_retryable"
    assert header["dlq"]["category"] == "validation"
    assert header["dlq"]["sourceQueue"] == setup.queue
    assert header["dlq"]["attempts"] == 1
    assert "invalid payload" in header["dlq"]["errorMessage"]
    assert message["headers"]["task"] == "tests.reject_input"


def _read_dlq_message(setup: Setup, task_id: str) -> dict:
    with Connection(BROKERS[setup.broker]) as connection:
        queue = connection.SimpleQueue(dlq_queue(f"{setup.queue}.dlq"))
        try:
            for _ in range(50):
                message = queue.get(timeout=5)
                message.ack()
                header = message.headers.get("tasktracker") or {}
                if header.get("taskId") == task_id:
                    args, kwargs, _embed = message.decode()
                    return {"args": args, "kwargs": kwargs, "headers": message.headers}
        finally:
            queue.close()
    raise AssertionError(f"no DLQ message for {task_id}")


def test_message_from_plain_producer_adopted(setup: Setup) -> None:
    user = key()
    # A separate process without the extension, as another service would be.
    script = (
        "import sys\n"
        "from celery import Celery\n"
        "app = Celery('plain-producer', broker=sys.argv[1])\n"
        "print(app.send_task('tests.notify', args=(sys.argv[3],), queue=sys.argv[2]).id)\n"
    )
    sent_id = subprocess.run(
        [sys.executable, "-c", script, BROKERS[setup.broker], setup.queue, user],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    record = setup.wait_status(sent_id, "completed")

    assert record["adopted"] is True
    assert record["taskId"] == setup.app.tasks["tests.notify"].build_task_key((user,)).task_id
    assert setup.runs(f"notify:{user}:email") == 1


def test_chord_with_equal_members_completes_once(
    setup: Setup, mongodb_uri: str,
) -> None:
    database = setup.mongo.name
    queue = unique_name("ttc")
    settings = {"broker_url": BROKERS[setup.broker], "mongodb_uri": mongodb_uri,
                "database": database, "queue": queue, "result_backend": RESULT_BACKEND}
    name = key()
    with running_workers(1, **settings) as workers:
        app = make_app(**settings)
        double, total = app.tasks["tests.double"], app.tasks["tests.total"]

        result = chord([double.s(name, 2), double.s(name, 2)])(total.s(f"{name}-total"))

        assert result.get(timeout=60) == 8
    delete_queues(BROKERS[setup.broker], [queue, workers[0].private_queue])
    assert setup.runs(name) == 2
    assert setup.runs(f"{name}-total") == 1
