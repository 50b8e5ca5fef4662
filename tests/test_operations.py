"""The operations behind ``celery tasktracker``, on real workers, brokers and MongoDB."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest
from celery import Celery

from celery_tasktracker import get_tracker, operations, signals
from celery_tasktracker.extension import TaskTracker
from celery_tasktracker.operations import DlqSelection
from celery_tasktracker.publish import build_document, register_send
from celery_tasktracker.store.base import utcnow
from celery_tasktracker.testing import free_port
from tests.harness import BROKERS, WorkerProcess, delete_queues, running_workers, unique_name
from tests.harness import wait_for as harness_wait_for
from tests.ops_app import make_ops_app

pytestmark = pytest.mark.worker

INCLUDE_OPS_TASKS = ("--include", "tests.ops_worker_tasks")


class SimulatedCrash(Exception):
    """Raised from a replay step hook to stop the replay as a crash would."""


@dataclasses.dataclass
class Setup:
    app: Celery
    broker: str
    queue: str
    worker: WorkerProcess
    mongo: pymongo.database.Database

    @property
    def tracker(self) -> TaskTracker:
        return get_tracker(self.app)

    @property
    def dlq(self) -> str:
        return f"{self.queue}.dlq"

    def runs(self, key: str) -> int:
        return self.mongo.body_runs.count_documents({"key": key})

    def record(self, celery_task_id: str) -> dict[str, Any] | None:
        return self.tracker.store.find_by_celery_id(celery_task_id)

    def execution(self, execution_id: str) -> dict[str, Any] | None:
        return self.tracker.store.get(execution_id)

    def wait_status(self, celery_task_id: str, status: str) -> dict[str, Any]:
        return wait_for(
            lambda: (r := self.record(celery_task_id)) and r["status"] == status and r,
            message=f"celery task {celery_task_id} to be {status}",
        )

    def wait_execution(self, execution_id: str, status: str) -> dict[str, Any]:
        return wait_for(
            lambda: (r := self.execution(execution_id)) and r["status"] == status and r,
            message=f"execution {execution_id} to be {status}",
        )

    def dead_letter(self, task_name: str = "tests.ops.fail_once", key: str | None = None
                    ) -> dict[str, Any]:
        """Send a task that fails with ValueError and return its dlq record."""
        result = self.app.tasks[task_name].delay(key or new_key())
        return self.wait_status(result.id, "dlq")

    def dlq_messages(self) -> int:
        return operations.count_dlq_messages(self.tracker, [self.dlq])[self.dlq]

    def on_dlq(self, execution_id: str) -> bool:
        """Return whether a message of *execution_id* is on the DLQ, leaving it there."""
        report = operations.purge_dlq(
            self.tracker, DlqSelection(execution_ids=(execution_id,)), dry_run=True,
        )
        return execution_id not in report.not_found

    def lost_send(self, task_name: str, args: tuple[Any, ...]) -> dict[str, Any]:
        """Record a send whose message never reached the broker (a producer crash)."""
        task = self.app.tasks[task_name]
        document = build_document(
            key=task.build_task_key(args), task_name=task_name,
            celery_task_id=str(uuid.uuid4()), queue=self.queue, attempt=0, now=utcnow(),
            dedup_window=self.tracker.config.dedup_window,
        )
        outcome = register_send(self.tracker, document)
        assert not outcome.is_duplicate
        return document

    def stuck(self, execution_id: str, older_than: dt.timedelta = dt.timedelta(0)
              ) -> list[operations.StuckExecution]:
        """Wait until stuck detection reports *execution_id*; return its entries."""
        return wait_for(
            lambda: [s for s in operations.find_stuck(self.tracker, older_than)
                     if s.record["executionId"] == execution_id],
            message=f"execution {execution_id} to be reported stuck",
        )

    def store_arguments(self, execution_id: str, args: list[Any]) -> None:
        # Stands in for a task that opts in to storing its arguments.
        self.tracker.store.collection.update_one(
            {"executionId": execution_id}, {"$set": {"args": args, "kwargs": {}}},
        )


def wait_for(condition: Any, *, message: str, timeout: float = 45) -> Any:
    return harness_wait_for(condition, timeout=timeout, message=message)


def new_key() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="module", params=["redis", "amqp"])
def setup(
    request: pytest.FixtureRequest, mongodb_uri: str, mongo_client: pymongo.MongoClient,
) -> Iterator[Setup]:
    broker = request.param
    database = unique_name("tto").replace("-", "_")
    queue = unique_name("ttq")
    settings = {"broker_url": BROKERS[broker], "mongodb_uri": mongodb_uri,
                "database": database, "queue": queue}
    with running_workers(1, extra_args=INCLUDE_OPS_TASKS, **settings) as workers:
        app = make_ops_app(**settings)
        yield Setup(app, broker, queue, workers[0], mongo_client[database])
    delete_queues(BROKERS[broker], [queue, f"{queue}.dlq", workers[0].private_queue])
    mongo_client.drop_database(database)


# -- durations -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("15m", 900), ("2h", 7200), ("7d", 604800), ("1h30m", 5400),
    ("0s", 0), ("1.5h", 5400), (" 2H ", 7200),
])
def test_parse_duration_accepts_units(text: str, seconds: float) -> None:
    assert operations.parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "h", "-5m", "5m 3s", "1h30"])
def test_parse_duration_rejects_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid duration .* for example 30s"):
        operations.parse_duration(text)


# -- stats -----------------------------------------------------------------------


def test_stats_counts_new_executions(setup: Setup) -> None:
    before = operations.stats(setup.tracker, queue=setup.queue)
    user = new_key()
    notify = setup.app.tasks["tests.notify"]

    first = notify.delay(user, seconds=1)
    setup.wait_status(first.id, "processing")
    notify.delay(user, seconds=1)
    completed = setup.wait_status(first.id, "completed")
    header = {"v": 1, "taskId": completed["taskId"], "executionId": completed["executionId"],
              "attempt": 0}
    setup.app.send_task("tests.notify", args=(user,), kwargs={"seconds": 1},
                        task_id=first.id, queue=setup.queue, headers={"tasktracker": header})
    wait_for(lambda: setup.record(first.id).get("duplicateDeliveries") == 1,
             message="the copied message to be skipped")
    setup.dead_letter()
    # RabbitMQ may count a message a moment after its publish returned.
    after = wait_for(lambda: (s := operations.stats(setup.tracker, queue=setup.queue))
                     and _messages(s, setup.dlq) - _messages(before, setup.dlq) == 1 and s,
                     message="the DLQ message to be counted")

    queue_before, queue_after = before.by_queue.get(setup.queue), after.by_queue[setup.queue]
    assert queue_after.total - (queue_before.total if queue_before else 0) == 2
    assert queue_after.statuses["completed"] - _count(queue_before, "completed") == 1
    assert queue_after.statuses["dlq"] - _count(queue_before, "dlq") == 1
    assert queue_after.categories["validation"] - _category(queue_before, "validation") == 1
    assert queue_after.deduplicated_sends - _dedup(queue_before) == 1
    assert queue_after.duplicate_deliveries - _deliveries(queue_before) == 1
    assert after.by_task["tests.ops.fail_once"].statuses["dlq"] >= 1
    depth = {d.queue: d for d in after.dlq}[setup.dlq]
    old_depth = {d.queue: d for d in before.dlq}.get(setup.dlq)
    assert depth.records - (old_depth.records if old_depth else 0) == 1
    assert after.broker_error is None


def _messages(result: operations.Stats, dlq: str) -> int:
    return sum(d.messages or 0 for d in result.dlq if d.queue == dlq)


def _count(counts: operations.Counts | None, status: str) -> int:
    return counts.statuses.get(status, 0) if counts else 0


def _category(counts: operations.Counts | None, category: str) -> int:
    return counts.categories.get(category, 0) if counts else 0


def _dedup(counts: operations.Counts | None) -> int:
    return counts.deduplicated_sends if counts else 0


def _deliveries(counts: operations.Counts | None) -> int:
    return counts.duplicate_deliveries if counts else 0


def test_stats_since_leaves_out_older_records(setup: Setup) -> None:
    record = setup.dead_letter()
    window = dt.timedelta(days=1)
    before = operations.stats(setup.tracker, queue=setup.queue, since=window)

    setup.tracker.store.collection.update_one(
        {"executionId": record["executionId"]},
        {"$set": {"createdAt": utcnow() - dt.timedelta(days=2)}},
    )
    after = operations.stats(setup.tracker, queue=setup.queue, since=window)

    assert after.since is not None
    assert before.by_queue[setup.queue].total - after.by_queue[setup.queue].total == 1


def test_stats_without_broker_reports_counts_unknown(setup: Setup, mongodb_uri: str) -> None:
    setup.dead_letter()
    app = make_ops_app(broker_url=f"redis://127.0.0.1:{free_port()}/0",
                       mongodb_uri=mongodb_uri, database=setup.mongo.name, queue=setup.queue)

    setup.app.set_current()
    result = operations.stats(get_tracker(app), queue=setup.queue)

    assert result.by_queue[setup.queue].total > 0
    assert [d.messages for d in result.dlq] == [None]
    assert result.broker_error is not None
    assert "could not connect to the broker" in result.broker_error


# -- trace -----------------------------------------------------------------------


def test_trace_same_chain_for_each_key(setup: Setup) -> None:
    result = setup.app.tasks["tests.flaky"].delay(new_key(), 2)
    task_id = wait_for(lambda: (r := setup.record(result.id)) and r["taskId"],
                       message="the first execution")
    chain = wait_for(lambda: (h := setup.tracker.history(task_id)) and len(h) == 3
                     and h[-1]["status"] == "completed" and h, message="three executions")

    by_task_id = operations.trace(setup.tracker, task_id)
    by_execution_id = operations.trace(setup.tracker, chain[1]["executionId"])
    by_celery_task_id = operations.trace(setup.tracker, result.id)

    assert by_task_id.matched == "taskId"
    assert by_execution_id.matched == "executionId"
    assert by_celery_task_id.matched == "celeryTaskId"
    expected = [d["executionId"] for d in chain]
    for found in (by_task_id, by_execution_id, by_celery_task_id):
        assert found.task_id == task_id
        assert [d["executionId"] for d in found.executions] == expected


def test_trace_unknown_key_raises(setup: Setup) -> None:
    with pytest.raises(operations.ExecutionNotFoundError, match="no-such-key"):
        operations.trace(setup.tracker, "no-such-key")


# -- stuck executions --------------------------------------------------------------


def test_find_stuck_reports_lost_queued_send(setup: Setup) -> None:
    document = setup.lost_send("tests.notify", (new_key(),))

    found = setup.stuck(document["executionId"])
    later = operations.find_stuck(setup.tracker, dt.timedelta(hours=1))

    assert [s.reason for s in found] == [operations.QUEUED_TOO_LONG]
    assert found[0].record["celeryTaskId"] == document["celeryTaskId"]
    assert document["executionId"] not in {s.record["executionId"] for s in later}


def test_find_stuck_reports_killed_pool_process(setup: Setup) -> None:
    announced: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        announced.append(kwargs)

    signals.stuck_execution_found.connect(receiver)
    try:
        result = setup.app.tasks["tests.notify"].delay(new_key(), seconds=60)
        record = setup.wait_status(result.id, "processing")
        os.kill(record["worker"]["pid"], signal.SIGKILL)

        found = setup.stuck(record["executionId"], dt.timedelta(hours=1))
    finally:
        signals.stuck_execution_found.disconnect(receiver)

    assert [s.reason for s in found] == [operations.LEASE_EXPIRED]
    assert found[0].record["status"] == "processing"
    assert record["executionId"] in {a["execution_id"] for a in announced}
    outcomes = operations.dead_letter_stuck(setup.tracker, found)
    assert [o.action for o in outcomes] == ["dead_lettered"]
    dead = setup.execution(record["executionId"])
    assert dead["status"] == "dlq"
    assert dead["dlqReason"] == "stuck"
    assert dead["dlqMessage"] == "none"
    assert dead["active"] is False
    still_stuck = operations.find_stuck(setup.tracker, dt.timedelta(hours=1))
    assert record["executionId"] not in {s.record["executionId"] for s in still_stuck}


def test_requeue_stuck_runs_lost_task_once(setup: Setup) -> None:
    user = new_key()
    document = setup.lost_send("tests.notify", (user,))
    setup.store_arguments(document["executionId"], [user])
    stuck = setup.stuck(document["executionId"])

    outcomes = operations.requeue_stuck(setup.tracker, stuck)
    new = setup.wait_execution(str(outcomes[0].new_execution_id), "completed")

    assert [o.action for o in outcomes] == ["requeued"]
    assert new["requeueOf"] == document["executionId"]
    assert new["taskId"] == document["taskId"]
    assert new["celeryTaskId"] == outcomes[0].new_celery_task_id
    old = setup.execution(document["executionId"])
    assert old["status"] == "failed"
    assert old["requeueExecutionId"] == new["executionId"]
    assert "requeuedAt" in old
    assert setup.runs(f"notify:{user}:email") == 1


def test_requeue_without_arguments_skipped(setup: Setup) -> None:
    document = setup.lost_send("tests.notify", (new_key(),))
    stuck = setup.stuck(document["executionId"])

    outcomes = operations.requeue_stuck(setup.tracker, stuck)

    assert [o.action for o in outcomes] == ["skipped"]
    assert "arguments are not stored" in outcomes[0].detail
    assert setup.execution(document["executionId"])["status"] == "queued"


def test_interrupted_requeue_finished_by_next_call(setup: Setup) -> None:
    user = new_key()
    document = setup.lost_send("tests.notify", (user,))
    setup.store_arguments(document["executionId"], [user])
    reserved_execution_id, reserved_celery_task_id = str(uuid.uuid4()), str(uuid.uuid4())
    # What an earlier call leaves behind when it stops right after step 1.
    setup.tracker.store.collection.update_one(
        {"executionId": document["executionId"]},
        {"$set": {"requeueExecutionId": reserved_execution_id,
                  "requeueCeleryTaskId": reserved_celery_task_id, "superseded": True,
                  "active": False}},
    )

    stuck = setup.stuck(document["executionId"])
    outcomes = operations.requeue_stuck(setup.tracker, stuck)
    new = setup.wait_execution(reserved_execution_id, "completed")

    assert [s.reason for s in stuck] == [operations.REQUEUE_PENDING]
    assert [o.new_execution_id for o in outcomes] == [reserved_execution_id]
    assert new["celeryTaskId"] == reserved_celery_task_id
    assert setup.runs(f"notify:{user}:email") == 1


def test_dead_lettered_lost_send_replayed(setup: Setup) -> None:
    user = new_key()
    document = setup.lost_send("tests.notify", (user,))
    setup.store_arguments(document["executionId"], [user])
    stuck = setup.stuck(document["executionId"])

    outcomes = operations.dead_letter_stuck(setup.tracker, stuck)
    wait_for(lambda: setup.on_dlq(document["executionId"]), message="the DLQ message")
    report = operations.replay_dlq(
        setup.tracker, DlqSelection(execution_ids=(document["executionId"],)))
    new_execution_id = str(report.outcomes[0].new_execution_id)

    assert [o.detail for o in outcomes] == [f"published to {setup.dlq}"]
    assert setup.execution(document["executionId"])["dlqMessage"] == "published"
    assert [o.action for o in report.outcomes] == ["replayed"]
    setup.wait_execution(new_execution_id, "completed")
    assert setup.execution(document["executionId"])["status"] == "archived"
    assert setup.runs(f"notify:{user}:email") == 1


# -- DLQ records -------------------------------------------------------------------


def test_list_dlq_filters(setup: Setup) -> None:
    first = setup.dead_letter("tests.ops.fail_once")
    second = setup.dead_letter("tests.ops.always_invalid")

    by_task_id = operations.list_dlq(setup.tracker, task_id=first["taskId"])
    by_name = operations.list_dlq(setup.tracker, task_name="tests.ops.always_invalid")
    by_category = operations.list_dlq(setup.tracker, category="VALIDATION",
                                      queue=setup.queue)
    by_other_category = operations.list_dlq(setup.tracker, category="transient")
    recent = operations.list_dlq(setup.tracker, newer_than=dt.timedelta(hours=1))
    old = operations.list_dlq(setup.tracker, older_than=dt.timedelta(hours=1))
    limited = operations.list_dlq(setup.tracker, limit=1)

    assert [r["executionId"] for r in by_task_id.records] == [first["executionId"]]
    assert by_task_id.total == 1
    assert second["executionId"] in {r["executionId"] for r in by_name.records}
    assert {r["taskName"] for r in by_name.records} == {"tests.ops.always_invalid"}
    assert {first["executionId"], second["executionId"]} <= {
        r["executionId"] for r in by_category.records}
    assert {r["errorCategory"] for r in by_other_category.records} <= {"transient"}
    assert first["executionId"] not in {r["executionId"] for r in by_other_category.records}
    assert second["executionId"] in {r["executionId"] for r in recent.records}
    assert old.records == []
    assert len(limited.records) == 1
    assert limited.total >= 2
    assert all("traceback" not in r for r in recent.records)


def test_show_dlq_includes_traceback(setup: Setup) -> None:
    record = setup.dead_letter()

    found = [operations.show_dlq(setup.tracker, key) for key in
             (record["executionId"], record["taskId"], record["celeryTaskId"])]

    assert [s["executionId"] for s in found] == [record["executionId"]] * 3
    assert "ValueError: invalid input for" in found[0]["traceback"]
    assert found[0]["errorType"] == "builtins.ValueError"
    with pytest.raises(operations.ExecutionNotFoundError, match="no-such-key"):
        operations.show_dlq(setup.tracker, "no-such-key")


# -- replay and purge ----------------------------------------------------------------


def test_replay_brings_task_back_to_completion(setup: Setup) -> None:
    key = new_key()
    record = setup.dead_letter(key=key)

    report = operations.replay_dlq(
        setup.tracker, DlqSelection(execution_ids=(record["executionId"],)))
    outcome = report.outcomes[0]
    new = setup.wait_execution(str(outcome.new_execution_id), "completed")

    assert [o.action for o in report.outcomes] == ["replayed"]
    assert report.not_found == []
    assert outcome.celery_task_id == record["celeryTaskId"]
    assert new["replayOf"] == record["executionId"]
    assert new["taskId"] == record["taskId"]
    assert new["attempt"] == 0
    assert new["celeryTaskId"] == outcome.new_celery_task_id
    assert new["result"] == repr(f"done {key}")
    archived = setup.execution(record["executionId"])
    assert archived["status"] == "archived"
    assert archived["archiveReason"] == "replayed"
    assert archived["replayExecutionId"] == new["executionId"]
    assert not setup.on_dlq(record["executionId"])
    assert setup.runs(key) == 2


@pytest.mark.parametrize("crash_after", ["reserved", "inserted", "published", "archived"])
def test_interrupted_replay_resumed_once(setup: Setup, crash_after: str) -> None:
    key = new_key()
    record = setup.dead_letter(key=key)
    selection = DlqSelection(execution_ids=(record["executionId"],))

    def crash(step: str, outcome: operations.DlqOutcome) -> None:
        if step == crash_after:
            raise SimulatedCrash(step)

    with pytest.raises(SimulatedCrash):
        operations.replay_dlq(setup.tracker, selection, after_step=crash)
    assert setup.on_dlq(record["executionId"])
    report = operations.replay_dlq(setup.tracker, selection)

    replays = list(setup.tracker.store.collection.find({"replayOf": record["executionId"]}))
    assert len(replays) == 1
    new = setup.wait_execution(replays[0]["executionId"], "completed")
    if crash_after == "published" and "not published again" not in report.outcomes[0].detail:
        # The resumed run published the same execution a second time; wait
        # until the worker has skipped that delivery before counting runs.
        wait_for(lambda: setup.execution(new["executionId"]).get("duplicateDeliveries") == 1,
                 message="the second delivery to be skipped")
    expected = "acked" if crash_after == "archived" else "replayed"
    assert [o.action for o in report.outcomes] == [expected]
    assert setup.execution(record["executionId"])["status"] == "archived"
    assert not setup.on_dlq(record["executionId"])
    assert setup.runs(key) == 2


def test_replay_skips_active_task_id_unless_forced(setup: Setup) -> None:
    key = new_key()
    record = setup.dead_letter(key=key)
    blocker = setup.lost_send("tests.ops.fail_once", (key,))
    selection = DlqSelection(task_ids=(record["taskId"],))

    skipped = operations.replay_dlq(setup.tracker, selection)
    still_there = setup.on_dlq(record["executionId"])
    forced = operations.replay_dlq(setup.tracker, selection, force=True)
    new = setup.wait_execution(str(forced.outcomes[0].new_execution_id), "completed")

    assert [o.action for o in skipped.outcomes] == ["skipped"]
    assert blocker["executionId"] in skipped.outcomes[0].detail
    assert still_there
    assert [o.action for o in forced.outcomes] == ["replayed"]
    assert new["forced"] is True
    assert new["active"] is False
    assert setup.runs(key) == 2


def test_replay_dry_run_changes_nothing(setup: Setup) -> None:
    record = setup.dead_letter()

    report = operations.replay_dlq(
        setup.tracker, DlqSelection(execution_ids=(record["executionId"],)), dry_run=True)

    assert [o.action for o in report.outcomes] == ["would_replay"]
    assert setup.execution(record["executionId"])["status"] == "dlq"
    assert "replayExecutionId" not in setup.execution(record["executionId"])
    assert setup.on_dlq(record["executionId"])


def test_replay_limit_stops_after_limit(setup: Setup) -> None:
    records = [setup.dead_letter("tests.ops.always_invalid") for _ in range(3)]
    selection = DlqSelection(execution_ids=tuple(r["executionId"] for r in records))

    report = operations.replay_dlq(setup.tracker, selection, limit=2)

    assert report.count("replayed") == 2
    statuses = sorted(setup.execution(r["executionId"])["status"] for r in records)
    assert statuses == ["archived", "archived", "dlq"]


def test_replay_of_archived_record_only_acks(setup: Setup) -> None:
    record = setup.dead_letter()
    # What an interrupted purge leaves: record archived, message still queued.
    setup.tracker.store.archive(record["executionId"], now=utcnow(), extra={})

    report = operations.replay_dlq(
        setup.tracker, DlqSelection(execution_ids=(record["executionId"],)))

    assert [o.action for o in report.outcomes] == ["acked"]
    assert setup.tracker.store.collection.count_documents(
        {"replayOf": record["executionId"]}) == 0
    assert not setup.on_dlq(record["executionId"])


def test_replay_restores_removed_record(setup: Setup) -> None:
    key = new_key()
    record = setup.dead_letter(key=key)
    # Retention removed the record while its message stayed on the DLQ.
    setup.tracker.store.collection.delete_one({"executionId": record["executionId"]})

    report = operations.replay_dlq(
        setup.tracker, DlqSelection(execution_ids=(record["executionId"],)))
    setup.wait_execution(str(report.outcomes[0].new_execution_id), "completed")

    restored = setup.execution(record["executionId"])
    assert restored["status"] == "archived"
    assert restored["restoredFromMessage"] is True
    assert restored["taskId"] == record["taskId"]
    assert setup.runs(key) == 2


def test_replay_reports_unknown_ids(setup: Setup) -> None:
    report = operations.replay_dlq(setup.tracker, DlqSelection(execution_ids=("missing",)))

    assert report.outcomes == []
    assert report.not_found == ["missing"]


def test_replay_requires_a_selection(setup: Setup) -> None:
    with pytest.raises(ValueError, match="no messages selected"):
        operations.replay_dlq(setup.tracker, DlqSelection())


def test_purge_archives_records_and_removes_messages(setup: Setup) -> None:
    records = [setup.dead_letter() for _ in range(2)]
    selection = DlqSelection(task_ids=tuple(r["taskId"] for r in records))

    dry = operations.purge_dlq(setup.tracker, selection, dry_run=True)
    report = operations.purge_dlq(setup.tracker, selection)

    assert [o.action for o in dry.outcomes] == ["would_purge"] * 2
    assert [o.action for o in report.outcomes] == ["purged"] * 2
    for record in records:
        archived = setup.execution(record["executionId"])
        assert archived["status"] == "archived"
        assert archived["archiveReason"] == "purged"
        assert not setup.on_dlq(record["executionId"])


def test_purge_archives_record_without_message(setup: Setup) -> None:
    document = setup.lost_send("tests.notify", (new_key(),))
    operations.dead_letter_stuck(setup.tracker, setup.stuck(document["executionId"]))
    selection = DlqSelection(execution_ids=(document["executionId"],))

    replay = operations.replay_dlq(setup.tracker, selection)
    purge = operations.purge_dlq(setup.tracker, selection)

    assert replay.not_found == [document["executionId"]]
    assert [o.action for o in purge.outcomes] == ["purged"]
    assert purge.outcomes[0].detail == "record without a DLQ message"
    assert purge.not_found == []
    assert setup.execution(document["executionId"])["status"] == "archived"
