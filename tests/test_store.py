"""The MongoDB store on the MongoDB test server: indexes, dedup insert, claim."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator

import pytest

from celery_tasktracker.config import TrackerConfig
from celery_tasktracker.publish import TaskKey, build_document
from celery_tasktracker.store import MongoStore
from celery_tasktracker.store.base import utcnow
from celery_tasktracker.store.mongo import LEASE_LAPSED, Claim


@pytest.fixture
def store(mongodb_uri: str, database: str) -> Iterator[MongoStore]:
    config = TrackerConfig.from_mapping({
        "tasktracker_mongodb_uri": mongodb_uri, "tasktracker_database": database,
    })
    store = MongoStore(config)
    yield store
    store.close()


def new_document(task_id: str = "ns:a", **kwargs: object) -> dict:
    options: dict = {"dedup_window": 300, **kwargs}
    return build_document(
        key=TaskKey(task_id), task_name="ns", celery_task_id="c-1", queue="q",
        attempt=0, now=utcnow(), **options,
    )


def claim(store: MongoStore, execution_id: str, lease: float = 30) -> Claim:
    now = utcnow()
    return store.claim(execution_id, worker={"hostname": "w", "pid": 1}, now=now,
                       lease_expires_at=now + dt.timedelta(seconds=lease))


def test_indexes_created_idempotently(store: MongoStore) -> None:
    store.ensure_indexes()
    store._indexes_ready = False
    store.ensure_indexes()

    names = set(store.collection.index_information())

    assert {"executionId_unique", "taskId_createdAt", "taskId_active_unique",
            "status_queue", "status_leaseExpiresAt", "finishedAt_ttl"} <= names


def test_second_active_insert_rejected(store: MongoStore) -> None:
    assert store.insert(new_document()) is True
    assert store.insert(new_document()) is False
    assert store.insert(new_document("ns:b")) is True


def test_insert_allowed_after_completion(store: MongoStore) -> None:
    first = new_document()
    store.insert(first)
    claim(store, first["executionId"])
    store.complete(first["executionId"], now=utcnow(), runtime_ms=1.0, result="1")

    assert store.insert(new_document()) is True


def test_non_key_holder_never_conflicts(store: MongoStore) -> None:
    store.insert(new_document())

    assert store.insert(new_document(holds_key=False)) is True


def test_claim_succeeds_once_among_threads(store: MongoStore) -> None:
    document = new_document()
    store.insert(document)
    store.ensure_indexes()
    results: list[Claim] = []
    barrier = threading.Barrier(8)

    def contend() -> None:
        barrier.wait()
        results.append(claim(store, document["executionId"]))

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert [r.execution_id for r in results].count(document["executionId"]) == 1
    assert sum(r.claimed for r in results) == 1
    assert len(results) == 8


def test_claim_rejected_while_lease_alive(store: MongoStore) -> None:
    document = new_document()
    store.insert(document)
    claim(store, document["executionId"])

    second = claim(store, document["executionId"])

    assert second.claimed is False
    assert second.record["status"] == "processing"


def test_claim_after_lease_lapsed_starts_new_execution(store: MongoStore) -> None:
    document = new_document()
    store.insert(document)
    claim(store, document["executionId"], lease=-1)

    taken = claim(store, document["executionId"])

    lapsed = store.get(document["executionId"])
    successor = store.get(taken.execution_id)
    assert taken.claimed is True
    assert taken.redelivered is True
    assert taken.execution_id != document["executionId"]
    assert lapsed["status"] == "failed"
    assert lapsed["errorType"] == LEASE_LAPSED
    assert lapsed["redeliveredAs"] == taken.execution_id
    assert successor["status"] == "processing"
    assert successor["redelivered"] is True
    assert successor["redeliveryOf"] == document["executionId"]
    assert successor["attempt"] == document["attempt"]
    assert successor["active"] is True


def test_claim_follows_redelivery_link(store: MongoStore) -> None:
    document = new_document()
    store.insert(document)
    claim(store, document["executionId"], lease=-1)
    first = claim(store, document["executionId"], lease=30)

    again = claim(store, document["executionId"])

    assert again.claimed is False
    assert again.record["executionId"] == first.execution_id
    assert again.record["status"] == "processing"


def test_completed_execution_never_reclaimed(store: MongoStore) -> None:
    document = new_document()
    store.insert(document)
    claim(store, document["executionId"], lease=-1)
    store.complete(document["executionId"], now=utcnow(), runtime_ms=2.0, result=None)

    reason = claim(store, document["executionId"])

    assert reason.claimed is False
    assert reason.record["status"] == "completed"


def test_claim_of_unknown_execution_returns_empty(store: MongoStore) -> None:
    assert claim(store, "00000000-0000-4000-8000-000000000000").record == {}


def test_stale_queued_record_superseded(store: MongoStore) -> None:
    document = new_document(dedup_window=0.001)
    store.insert(document)
    later = utcnow() + dt.timedelta(seconds=1)

    assert store.note_deduplicated("ns:a", later) is None
    assert store.supersede_if_stale(store.find_active("ns:a"), later) is True
    assert store.insert(new_document()) is True
    assert claim(store, document["executionId"]).record["superseded"] is True


def test_live_record_not_superseded(store: MongoStore) -> None:
    store.insert(new_document())

    holder = store.note_deduplicated("ns:a", utcnow())

    assert holder is not None
    assert holder["deduplicatedSends"] == 1
    assert store.supersede_if_stale(holder, utcnow()) is False


def test_history_returns_chain_in_order(store: MongoStore) -> None:
    for attempt in range(3):
        document = new_document()
        document["attempt"] = attempt
        store.insert(document)
        claim(store, document["executionId"])
        store.fail(document["executionId"], now=utcnow(), error={"errorCategory": "transient"})

    chain = store.history("ns:a")

    assert [d["attempt"] for d in chain] == [0, 1, 2]
    assert {d["status"] for d in chain} == {"failed"}


def test_counts_by_status_per_queue(store: MongoStore) -> None:
    store.insert(new_document("ns:a"))
    store.insert(new_document("ns:b"))
    document = new_document("ns:c")
    store.insert(document)
    claim(store, document["executionId"])

    assert store.counts_by_status("q") == {"q": {"queued": 2, "processing": 1}}


def _use_store_in_child(store: MongoStore, parent_client_id: int, results: object) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forgotten = store._client is None
        store.collection.find_one({})
        fresh = store._client is not None and id(store._client) != parent_client_id
    results.put((forgotten, fresh, [str(w.message) for w in caught]))  # type: ignore[attr-defined]


def test_forked_child_opens_own_client(store: MongoStore) -> None:
    import multiprocessing

    store.collection.find_one({})
    parent_client = store._client
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    child = context.Process(target=_use_store_in_child,
                            args=(store, id(parent_client), results))
    child.start()
    forgotten, fresh, warned = results.get(timeout=60)
    child.join(timeout=60)

    assert child.exitcode == 0
    assert forgotten is True
    assert fresh is True
    assert not [message for message in warned if "fork" in message]
    assert store._client is parent_client
    assert store.collection.find_one({"executionId": "none"}) is None


def test_collection_reused_within_process(store: MongoStore) -> None:
    first = store.collection

    assert store.collection is first
