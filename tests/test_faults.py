"""Fault tests on real prefork workers: killed processes, MongoDB restarts, key releases.

The worker cases count body runs in MongoDB (``body_runs``): a body that wrote
its ``done`` record ran to the end. For each taskId the tests assert that
none was lost (no completed body) and none duplicated (more than one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.utils import uuid as celery_uuid

from celery_tasktracker import StoreUnavailableError, get_tracker
from celery_tasktracker.config import TrackerConfig
from celery_tasktracker.publish import TaskKey, build_document
from celery_tasktracker.store import MongoStore
from celery_tasktracker.store.base import utcnow
from celery_tasktracker.store.mongo import LEASE_LAPSED, Claim
from tests.fault_app import make_fault_app
from tests.fault_harness import (
    FaultCluster,
    RestartableMongo,
    fault_cluster,
    kill_pool_child,
    purge_redis_queues,
    seconds_left,
)
from tests.harness import BROKERS, unique_name, wait_for

pytestmark = pytest.mark.worker

#: Kill rounds per broker; each round kills one process running one task.
ROUNDS = 3


def new_key() -> str:
    return uuid.uuid4().hex[:12]


@dataclasses.dataclass
class Round:
    """One killed task: its execution history and its body runs."""

    key: str
    killed_hostname: str
    history: list[dict[str, Any]]
    starts: int = 0
    completions: int = 0


def count_runs(cluster: FaultCluster, rounds: list[Round]) -> list[Round]:
    # Counted once every round has settled, so a late duplicate still shows.
    for played in rounds:
        played.starts = len(cluster.starts(played.key))
        played.completions = cluster.completions(played.key)
    return rounds


def lost(rounds: list[Round]) -> int:
    return sum(1 for played in rounds if played.completions == 0)


def duplicated(rounds: list[Round]) -> int:
    return sum(1 for played in rounds if played.completions > 1)


def worker_output(cluster: FaultCluster) -> str:
    return "\n".join(w.output() for w in [*cluster.workers, *cluster.retired])


# -- a pool process killed mid-task, late acks -------------------------------


@pytest.fixture(scope="module", params=["redis", "amqp"])
def child_kill_rounds(request: pytest.FixtureRequest, mongodb_uri: str) -> list[Round]:
    with fault_cluster(BROKERS[request.param], mongodb_uri) as cluster:
        rounds = []
        for _ in range(ROUNDS):
            key = new_key()
            cluster.send(key, seconds=2)
            start = cluster.wait_started(key)
            kill_pool_child(start["pid"], cluster.workers)
            rounds.append(Round(key, start["hostname"], cluster.wait_completed(key)))
        return count_runs(cluster, rounds)


def test_child_kill_loses_no_task(child_kill_rounds: list[Round]) -> None:
    assert lost(child_kill_rounds) == 0


def test_child_kill_duplicates_no_body(child_kill_rounds: list[Round]) -> None:
    assert duplicated(child_kill_rounds) == 0


def test_child_kill_interrupts_first_body(child_kill_rounds: list[Round]) -> None:
    assert [played.starts for played in child_kill_rounds] == [2] * ROUNDS


def test_child_kill_closes_lapsed_attempt(child_kill_rounds: list[Round]) -> None:
    for played in child_kill_rounds:
        lapsed, successor = played.history

        assert lapsed["status"] == "failed"
        assert lapsed["errorType"] == LEASE_LAPSED
        assert lapsed["workerLost"] is True
        assert lapsed["redeliveredAs"] == successor["executionId"]
        assert lapsed["active"] is False


def test_child_kill_redelivers_as_new_execution(child_kill_rounds: list[Round]) -> None:
    for played in child_kill_rounds:
        lapsed, successor = played.history

        assert successor["status"] == "completed"
        assert successor["redelivered"] is True
        assert successor["redeliveryOf"] == lapsed["executionId"]
        assert successor["attempt"] == lapsed["attempt"]
        assert successor["celeryTaskId"] == lapsed["celeryTaskId"]
        assert successor["taskId"] == lapsed["taskId"]


# -- a whole worker killed mid-task, late acks, a second worker running -------


@pytest.fixture(scope="module", params=["redis", "amqp"])
def worker_kill_rounds(request: pytest.FixtureRequest, mongodb_uri: str) -> list[Round]:
    # Redis hands a dead consumer's unacknowledged message out again after
    # the visibility timeout; RabbitMQ does so when the connection drops.
    with fault_cluster(BROKERS[request.param], mongodb_uri, workers=2,
                       visibility_timeout=6) as cluster:
        rounds = []
        for _ in range(ROUNDS):
            key = new_key()
            cluster.send(key, seconds=2.5)
            start = cluster.wait_started(key)
            cluster.kill_worker(cluster.worker_named(start["hostname"]))
            cluster.add_worker()
            history = cluster.wait_completed(key, timeout=60)
            rounds.append(Round(key, start["hostname"], history))
        return count_runs(cluster, rounds)


def test_worker_kill_loses_no_task(worker_kill_rounds: list[Round]) -> None:
    assert lost(worker_kill_rounds) == 0


def test_worker_kill_duplicates_no_body(worker_kill_rounds: list[Round]) -> None:
    assert duplicated(worker_kill_rounds) == 0


def test_worker_kill_hands_over_lapsed_lease(worker_kill_rounds: list[Round]) -> None:
    for played in worker_kill_rounds:
        lapsed, successor = played.history

        assert lapsed["status"] == "failed"
        assert lapsed["errorType"] == LEASE_LAPSED
        assert lapsed["redeliveredAs"] == successor["executionId"]
        assert lapsed["worker"]["hostname"] == played.killed_hostname
        assert successor["status"] == "completed"
        assert successor["redelivered"] is True
        assert successor["worker"]["hostname"] != played.killed_hostname


# -- early acks: a killed pool process leaves a record to detect --------------


@dataclasses.dataclass
class EarlyAckCrash:
    key: str
    crashed: dict[str, Any]
    completions_after_crash: int
    first_celery_task_id: str
    second_celery_task_id: str
    history: list[dict[str, Any]]
    completions: int


@pytest.fixture(scope="module")
def early_ack_crash(mongodb_uri: str) -> EarlyAckCrash:
    with fault_cluster(BROKERS["redis"], mongodb_uri, acks_late=False) as cluster:
        key = new_key()
        first = cluster.send(key, seconds=3)
        start = cluster.wait_started(key)
        kill_pool_child(start["pid"], cluster.workers)
        crashed = wait_for(lambda: (h := cluster.history(key)) and h[0].get("workerLost")
                           and h[0], message="the lost pool process to be recorded")
        completions_after_crash = cluster.completions(key)

        second = cluster.send(key, seconds=0.2)
        history = cluster.wait_completed(key)
        return EarlyAckCrash(key, crashed, completions_after_crash, first.id, second.id,
                             history, cluster.completions(key))


def test_early_ack_crash_leaves_processing_record(early_ack_crash: EarlyAckCrash) -> None:
    assert early_ack_crash.crashed["status"] == "processing"
    assert early_ack_crash.completions_after_crash == 0


def test_early_ack_crash_expires_lease_at_once(early_ack_crash: EarlyAckCrash) -> None:
    lease = early_ack_crash.crashed["leaseExpiresAt"]

    assert lease <= early_ack_crash.crashed["updatedAt"]


def test_early_ack_crash_accepts_new_send(early_ack_crash: EarlyAckCrash) -> None:
    crashed, successor = early_ack_crash.history

    assert early_ack_crash.second_celery_task_id != early_ack_crash.first_celery_task_id
    assert crashed["superseded"] is True
    assert crashed["active"] is False
    assert successor["status"] == "completed"
    assert early_ack_crash.completions == 1


# -- a task longer than a short Redis visibility timeout ----------------------


def test_task_past_visibility_timeout_runs_once(mongodb_uri: str) -> None:
    # Redis hands the running message out again after 3.5 s, and the lease,
    # renewed every 0.4 s, keeps the copy from running the body.
    with fault_cluster(BROKERS["redis"], mongodb_uri, workers=2, lease=2,
                       lease_renewal_interval=0.4, visibility_timeout=3.5) as cluster:
        key = new_key()
        result = cluster.send(key, seconds=7)
        history = cluster.wait_completed(key)
        skipped = wait_for(lambda: get_tracker(cluster.app).store.get(
            history[0]["executionId"]).get("duplicateDeliveries"),
            message="the redelivered copy to be skipped")
        output = worker_output(cluster)
        starts, completions = len(cluster.starts(key)), cluster.completions(key)

    assert f"(celery task id {result.id}) by " in output
    assert skipped >= 1
    assert len(history) == 1
    assert starts == 1
    assert completions == 1


def test_long_task_survives_kill_after_redelivery(mongodb_uri: str) -> None:
    # Redis hands the running message out again after the visibility
    # timeout, and that copy is deferred and acknowledged. When the worker
    # running the body dies after that, a later copy must still be waiting.
    with fault_cluster(BROKERS["redis"], mongodb_uri, workers=2, lease=2,
                       lease_renewal_interval=0.4, visibility_timeout=3.5) as cluster:
        key = new_key()
        cluster.send(key, seconds=12)
        start = cluster.wait_started(key)
        # The copy comes back 3.5 to 4.5 s after the start and is deferred
        # by at most 3 s, so it was seen again before the last 2.5 s.
        wait_for(lambda: seconds_left(start) < 2.5, timeout=30,
                 message="the body to reach its last 2.5 s")
        cluster.kill_worker(cluster.worker_named(start["hostname"]))
        cluster.add_worker()
        history = cluster.wait_completed(key, timeout=60)
        starts, completions = len(cluster.starts(key)), cluster.completions(key)

    assert starts == 2
    assert completions == 1
    assert history[0]["errorType"] == LEASE_LAPSED
    assert history[-1]["redelivered"] is True


# -- MongoDB stopped and restarted --------------------------------------------


@pytest.fixture(scope="module")
def restartable_mongo() -> Iterator[RestartableMongo]:
    with RestartableMongo() as server:
        yield server


@pytest.fixture(scope="module")
def outage_cluster(restartable_mongo: RestartableMongo) -> Iterator[FaultCluster]:
    with fault_cluster(BROKERS["redis"], restartable_mongo.uri) as cluster:
        yield cluster


@dataclasses.dataclass
class Outage:
    #: When the server was started again; no write can succeed before.
    ended_at: dt.datetime | None = None


@contextlib.contextmanager
def mongo_outage(server: RestartableMongo) -> Iterator[Outage]:
    """Stop the server for the block; start it again even when the block fails."""
    outage = Outage()
    server.stop()
    try:
        yield outage
    finally:
        if not server.running:
            outage.ended_at = utcnow()
            server.start()


def test_send_during_outage_raises(
    outage_cluster: FaultCluster, restartable_mongo: RestartableMongo,
) -> None:
    with mongo_outage(restartable_mongo), pytest.raises(StoreUnavailableError):
        outage_cluster.send(new_key(), seconds=0.2)


def test_untracked_send_during_outage_runs_once(
    outage_cluster: FaultCluster, restartable_mongo: RestartableMongo,
) -> None:
    producer = make_fault_app(dataclasses.replace(
        outage_cluster.settings, store_unavailable="send_untracked"))
    key = new_key()

    with mongo_outage(restartable_mongo):
        result = producer.tasks["faults.work"].delay(key, 0.2)
        wait_for(lambda: f"(celery task id {result.id}) by "
                 in worker_output(outage_cluster), message="the claim to be deferred")
    history = outage_cluster.wait_completed(key)

    assert len(history) == 1
    assert history[0]["adopted"] is True
    assert history[0]["celeryTaskId"] == result.id
    assert outage_cluster.completions(key) == 1


def test_claim_during_outage_runs_after_restart(
    outage_cluster: FaultCluster, restartable_mongo: RestartableMongo,
) -> None:
    key = new_key()

    result = outage_cluster.send(key, seconds=0.2, countdown=2)
    with mongo_outage(restartable_mongo):
        wait_for(lambda: f"(celery task id {result.id}) by "
                 in worker_output(outage_cluster), message="the claim to be deferred")
    history = outage_cluster.wait_completed(key)

    assert len(history) == 1
    assert history[0]["celeryTaskId"] == result.id
    assert outage_cluster.completions(key) == 1


def test_completion_during_outage_recorded_after_restart(
    outage_cluster: FaultCluster, restartable_mongo: RestartableMongo,
) -> None:
    key = new_key()

    outage_cluster.send(key, seconds=0.2, tail=4)
    wait_for(lambda: outage_cluster.completions(key) == 1, message="the body's work to end")
    before_outage = outage_cluster.history(key)
    with mongo_outage(restartable_mongo) as outage:
        # Long enough for the tail to end and the outcome write to fail.
        time.sleep(5)
    history = outage_cluster.wait_completed(key, timeout=60)

    assert before_outage[0]["status"] == "processing"
    assert len(history) == 1
    assert history[0]["completedAt"] >= outage.ended_at
    assert outage_cluster.completions(key) == 1


# -- releasing dedup keys -----------------------------------------------------


@pytest.fixture(scope="module")
def release_cluster(mongodb_uri: str) -> Iterator[FaultCluster]:
    with fault_cluster(BROKERS["redis"], mongodb_uri) as cluster:
        yield cluster


def test_revoke_releases_key(release_cluster: FaultCluster) -> None:
    key = new_key()
    first = release_cluster.send(key, seconds=0.2, countdown=2)

    release_cluster.app.control.revoke(first.id)
    revoked = wait_for(lambda: (h := release_cluster.history(key)) and h[0].get("revoked")
                       and h[0], message="the revoke to be recorded")
    second = release_cluster.send(key, seconds=0.2)
    history = release_cluster.wait_completed(key)

    assert revoked["status"] == "failed"
    assert revoked["active"] is False
    assert second.id != first.id
    assert len(history) == 2
    assert release_cluster.completions(key) == 1


def test_hard_time_limit_records_timeout(release_cluster: FaultCluster) -> None:
    key = new_key()
    overrun = release_cluster.app.tasks["faults.overrun"]

    first = overrun.delay(key)
    record = wait_for(lambda: (h := release_cluster.history(key, "faults.overrun"))
                      and h[0]["status"] == "failed" and h[0],
                      message="the time limit to be recorded")
    idle_queue = unique_name("ttf-idle")
    second = overrun.apply_async((key,), queue=idle_queue)
    purge_redis_queues(release_cluster.settings.broker_url, [idle_queue])

    assert record["errorCategory"] == "timeout"
    assert record["active"] is False
    assert second.id != first.id


def test_stale_queued_record_allows_send(
    release_cluster: FaultCluster, mongodb_uri: str,
) -> None:
    # No worker consumes this queue, so the first execution stays queued.
    settings = dataclasses.replace(release_cluster.settings, queue=unique_name("ttf-idle"),
                                   dedup_window=1)
    producer = make_fault_app(settings)
    work = producer.tasks["faults.work"]
    key = new_key()

    first = work.delay(key)
    duplicate = work.delay(key)
    task_id = work.build_task_key((key,)).task_id
    stale = wait_for(lambda: (r := get_tracker(producer).store.find_active(task_id))
                     and r["dedupExpiresAt"] < utcnow() and r,
                     message="the dedup window to pass")
    second = work.delay(key)
    superseded = get_tracker(producer).store.get(stale["executionId"])
    purge_redis_queues(settings.broker_url, [settings.queue])

    assert duplicate.id == first.id
    assert second.id != first.id
    assert superseded["superseded"] is True
    assert superseded["active"] is False


def test_missing_successor_delivery_runs_once(mongodb_uri: str) -> None:
    # The state a claim leaves when MongoDB goes away between closing the
    # lapsed attempt and inserting its successor: the next delivery follows
    # redeliveredAs to a record that does not exist.
    with fault_cluster(BROKERS["redis"], mongodb_uri, workers=0) as cluster:
        key = new_key()
        cluster.send(key, seconds=0.2)
        record = cluster.history(key)[0]
        get_tracker(cluster.app).store.collection.update_one(
            {"executionId": record["executionId"]},
            {"$set": {"status": "failed", "active": False, "errorType": LEASE_LAPSED,
                      "redeliveredAs": str(uuid.uuid4()), "redeliveryHoldsKey": True,
                      "completedAt": utcnow()}},
        )
        cluster.add_worker()
        history = cluster.wait_completed(key)
        completions = cluster.completions(key)

    assert completions == 1
    assert history[-1]["redelivered"] is True
    assert history[-1]["executionId"] == history[0]["redeliveredAs"]


# -- compare-and-set releases on the store --------------------------------------


@pytest.fixture
def store(mongodb_uri: str, database: str) -> Iterator[MongoStore]:
    config = TrackerConfig.from_mapping({
        "tasktracker_mongodb_uri": mongodb_uri, "tasktracker_database": database,
    })
    store = MongoStore(config)
    yield store
    store.close()


def claim(store: MongoStore, execution_id: str, lease: float = 30) -> Claim:
    now = utcnow()
    return store.claim(execution_id, worker={"hostname": "w", "pid": 1}, now=now,
                       lease_expires_at=now + dt.timedelta(seconds=lease))


def taken_over(store: MongoStore) -> tuple[str, str]:
    """Insert an execution, let its lease lapse and claim it again; return both ids."""
    document = build_document(
        key=TaskKey("faults:cas"), task_name="faults.work", celery_task_id=celery_uuid(),
        queue="q", attempt=0, now=utcnow(), dedup_window=300,
    )
    store.insert(document)
    claim(store, document["executionId"], lease=-1)
    successor = claim(store, document["executionId"])
    assert successor.execution_id is not None
    return document["executionId"], successor.execution_id


def test_complete_by_lapsed_owner_changes_nothing(store: MongoStore) -> None:
    lapsed, successor = taken_over(store)

    changed = store.complete(lapsed, now=utcnow(), runtime_ms=1.0, result="late")

    assert changed is False
    assert store.get(lapsed)["status"] == "failed"
    assert store.get(successor)["status"] == "processing"
    assert store.get(successor)["active"] is True


def test_fail_by_lapsed_owner_changes_nothing(store: MongoStore) -> None:
    lapsed, successor = taken_over(store)

    changed = store.fail(lapsed, now=utcnow(), error={"errorCategory": "unknown"})

    assert changed is False
    assert store.get(lapsed)["errorType"] == LEASE_LAPSED
    assert store.get(successor)["status"] == "processing"
    assert store.get(successor)["active"] is True


def test_supersede_of_other_execution_changes_nothing(store: MongoStore) -> None:
    lapsed, successor = taken_over(store)
    stale_view = {**store.get(lapsed), "status": "processing"}

    changed = store.supersede_if_stale(stale_view, utcnow() + dt.timedelta(hours=1))

    assert changed is False
    assert store.get(successor)["active"] is True


def new_work_document() -> dict[str, Any]:
    return build_document(
        key=TaskKey("faults:gap"), task_name="faults.work", celery_task_id=celery_uuid(),
        queue="q", attempt=0, now=utcnow(), dedup_window=300,
    )


def close_without_successor(
    store: MongoStore, execution_id: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Take over a lapsed execution while the successor insert fails."""
    claim(store, execution_id, lease=-1)

    def store_gone(successor: dict[str, Any]) -> bool:
        raise StoreUnavailableError("the store went away before the successor was inserted")

    with monkeypatch.context() as patch:
        patch.setattr(store, "insert", store_gone)
        with pytest.raises(StoreUnavailableError):
            claim(store, execution_id)


def test_claim_inserts_successor_lost_with_store(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    document = new_work_document()
    store.insert(document)
    close_without_successor(store, document["executionId"], monkeypatch)

    retried = claim(store, document["executionId"])

    lapsed = store.get(document["executionId"])
    assert retried.claimed is True
    assert retried.execution_id == lapsed["redeliveredAs"]
    assert store.get(retried.execution_id)["redeliveryOf"] == document["executionId"]
    assert store.get(retried.execution_id)["active"] is True


def test_claim_skips_successor_after_newer_send(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    document = new_work_document()
    store.insert(document)
    close_without_successor(store, document["executionId"], monkeypatch)
    newer = new_work_document()
    store.insert(newer)

    retried = claim(store, document["executionId"])

    assert retried.claimed is False
    assert retried.record["executionId"] == newer["executionId"]
    assert store.find_active("faults:gap")["executionId"] == newer["executionId"]
