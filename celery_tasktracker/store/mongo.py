"""The MongoDB store: one document per execution, compare-and-set transitions."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import pymongo
from celery.utils.log import get_logger
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure, PyMongoError

from ..config import TrackerConfig
from ..exceptions import StoreUnavailableError
from ..ids import new_execution_id
from .base import ARCHIVED, COMPLETED, DLQ, FAILED, PROCESSING, QUEUED

if TYPE_CHECKING:
    from pymongo.monitoring import _EventListener

__all__ = ["Claim", "MongoStore"]

logger = get_logger(__name__)

T = TypeVar("T")

Document = dict[str, Any]

#: Name of the unique partial index that makes an insert the dedup check.
DEDUP_INDEX = "taskId_active_unique"

#: errorType recorded on an execution whose worker stopped renewing its lease.
LEASE_LAPSED = "celery_tasktracker.LeaseLapsed"

#: Redelivery links followed by one claim before giving up.
_MAX_REDELIVERY_HOPS = 5

#: Fields a redelivered execution copies from the lapsed one.
_INHERITED = ("taskId", "celeryTaskId", "taskName", "queue", "attempt", "keyParts",
              "retryOf", "replayOf", "adopted", "forced", "groupId")


@dataclasses.dataclass(frozen=True)
class Claim:
    """Outcome of :meth:`MongoStore.claim`."""

    #: The execution now held by the caller, or None when the claim failed.
    execution_id: str | None
    #: The record that blocked the claim; ``{}`` when no record exists.
    record: Document | None = None
    #: True when the caller took over from a lapsed lease.
    redelivered: bool = False

    @property
    def claimed(self) -> bool:
        return self.execution_id is not None


def _index_models(retention: float) -> list[pymongo.IndexModel]:
    # Each index serves one query of the product; see the schema page of
    # the docs for which.
    return [
        pymongo.IndexModel([("executionId", 1)], name="executionId_unique", unique=True),
        pymongo.IndexModel([("taskId", 1), ("createdAt", 1)], name="taskId_createdAt"),
        pymongo.IndexModel(
            [("taskId", 1)], name=DEDUP_INDEX, unique=True,
            partialFilterExpression={"active": True},
        ),
        pymongo.IndexModel([("status", 1), ("queue", 1)], name="status_queue"),
        pymongo.IndexModel([("status", 1), ("leaseExpiresAt", 1)], name="status_leaseExpiresAt"),
        # Only records with finishedAt expire: a dlq record has none until it
        # is archived, so retention never removes one whose message waits.
        pymongo.IndexModel(
            [("finishedAt", 1)], name="finishedAt_ttl", expireAfterSeconds=int(retention),
        ),
        pymongo.IndexModel([("celeryTaskId", 1)], name="celeryTaskId"),
    ]


#: Every store of this process, so a forked child can drop the parent's clients.
_stores: weakref.WeakSet[MongoStore] = weakref.WeakSet()


def _forget_clients_after_fork() -> None:
    # The child must neither use nor close a client it inherited: closing
    # would end sessions over sockets the parent still owns. Drop the
    # references and replace locks another parent thread may have held.
    for store in list(_stores):
        store._forget_client()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_clients_after_fork)


class MongoStore:
    """Execution records in one MongoDB collection.

    The client is created lazily and once per process: a process forked
    from another one (a prefork pool child) opens its own client and never
    touches the parent's. *event_listeners* are pymongo monitoring listeners
    (for example a ``pymongo.monitoring.CommandListener``) attached to the
    client of every process.
    """

    def __init__(
        self, config: TrackerConfig, *, event_listeners: Sequence[_EventListener] = (),
    ) -> None:
        self.config = config
        self.event_listeners = list(event_listeners)
        self._lock = threading.Lock()
        self._client: pymongo.MongoClient[Document] | None = None
        self._collection: Collection[Document] | None = None
        self._pid: int | None = None
        self._indexes_ready = False
        _stores.add(self)

    # -- connection -------------------------------------------------------

    @property
    def collection(self) -> Collection[Document]:
        """The collection, connecting on first use in this process."""
        collection = self._collection
        if collection is not None and self._pid == os.getpid():
            return collection
        with self._lock:
            if self._collection is None or self._pid != os.getpid():
                client = self._connect()
                database = (client.get_database(self.config.database) if self.config.database
                            else client.get_default_database("celery_tasktracker"))
                self._client = client
                self._collection = database.get_collection(self.config.collection)
                self._pid = os.getpid()
            return self._collection

    def _connect(self) -> pymongo.MongoClient[Document]:
        timeout_ms = int(self.config.mongodb_timeout * 1000)
        logger.debug("tasktracker: connecting to %s", self.config.masked_uri)
        return pymongo.MongoClient(
            self.config.mongodb_uri,
            tz_aware=True,
            connect=False,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            socketTimeoutMS=timeout_ms,
            appname="celery-tasktracker",
            event_listeners=self.event_listeners,
        )

    def close(self) -> None:
        """Close this process's client; the next operation reconnects."""
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                self._client.close()
            self._client = None
            self._collection = None
            self._pid = None

    def _forget_client(self) -> None:
        self._lock = threading.Lock()
        self._client = None
        self._collection = None
        self._pid = None

    def _run(self, what: str, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except (DuplicateKeyError, BulkWriteError):
            # Callers read the duplicate-key details of these two.
            raise
        except PyMongoError as exc:
            raise StoreUnavailableError(
                f"tracking store operation {what!r} failed on {self.config.masked_uri}: "
                f"{exc}"
            ) from exc

    def ensure_indexes(self) -> None:
        """Create the indexes the store relies on; safe to call repeatedly."""
        if self._indexes_ready:
            return
        models = _index_models(self.config.retention)
        try:
            self._run("create_indexes", lambda: self.collection.create_indexes(models))
        except StoreUnavailableError as exc:
            if not isinstance(exc.__cause__, OperationFailure):
                raise
            # An index of the same name with other options exists, most often
            # a TTL created under another tasktracker_retention. Keep it.
            logger.warning(
                "tasktracker: kept existing indexes of %s.%s whose options differ: %s",
                self.collection.database.name, self.config.collection, exc.__cause__,
            )
        self._indexes_ready = True

    # -- writes -----------------------------------------------------------

    def insert(self, document: Document) -> bool:
        """Insert a new execution; return False if its taskId is already active."""
        self.ensure_indexes()
        try:
            self._run("insert", lambda: self.collection.insert_one(document))
        except DuplicateKeyError as exc:
            if (exc.details or {}).get("keyPattern", {}).get("executionId"):
                raise
            return False
        finally:
            # insert_one adds the generated _id to the caller's dict.
            document.pop("_id", None)
        return True

    def insert_many_unordered(self, documents: list[Document]) -> list[bool]:
        """Insert executions in one round trip; return which were inserted."""
        self.ensure_indexes()
        inserted = [True] * len(documents)
        if not documents:
            return inserted
        try:
            self._run(
                "insert_many",
                lambda: self.collection.insert_many(documents, ordered=False),
            )
        except BulkWriteError as exc:
            for error in exc.details.get("writeErrors", []):
                if error.get("code") != 11000:
                    raise StoreUnavailableError(
                        f"tracking store insert_many failed: {error.get('errmsg')}"
                    ) from exc
                inserted[error["index"]] = False
        finally:
            for document in documents:
                document.pop("_id", None)
        return inserted

    def delete_unsent(self, execution_ids: list[str]) -> int:
        """Delete queued records whose messages were never published; return how many."""
        if not execution_ids:
            return 0
        outcome = self._run("delete_unsent", lambda: self.collection.delete_many(
            {"executionId": {"$in": execution_ids}, "status": QUEUED},
        ))
        return outcome.deleted_count

    def note_deduplicated(
        self, task_id: str, now: dt.datetime, *, counter: str = "deduplicatedSends",
    ) -> Document | None:
        """Count a rejected send on the live execution of *task_id* and return it.

        Live means queued within its dedup window or processing within its
        lease; a stale holder is not counted and ``None`` is returned. Observe
        mode counts on ``wouldDeduplicateSends`` instead.
        """
        live = [
            {"status": QUEUED, "dedupExpiresAt": {"$gte": now}},
            {"status": PROCESSING, "leaseExpiresAt": {"$gte": now}},
        ]
        return self._run("note_deduplicated", lambda: self.collection.find_one_and_update(
            {"taskId": task_id, "active": True, "$or": live},
            {"$inc": {counter: 1}, "$set": {"lastDeduplicatedAt": now}},
            return_document=pymongo.ReturnDocument.AFTER,
        ))

    def supersede_if_stale(self, document: Mapping[str, Any], now: dt.datetime) -> bool:
        """Release the dedup key of *document* if it no longer blocks sends.

        A queued execution blocks until its ``dedupExpiresAt``; a processing
        one while its lease is alive. The update is a compare-and-set on the
        executionId and the state that was read, so a record that moved in
        between is left alone. A superseded execution is never claimed.
        """
        status = document.get("status")
        if status == QUEUED:
            stale = {"status": QUEUED, "dedupExpiresAt": {"$lt": now}}
        elif status == PROCESSING:
            stale = {"status": PROCESSING, "leaseExpiresAt": {"$lt": now}}
        else:
            return False
        result = self._run("supersede", lambda: self.collection.update_one(
            {"executionId": document["executionId"], "active": True, **stale},
            {"$set": {"active": False, "superseded": True, "updatedAt": now}},
        ))
        return result.modified_count == 1

    def supersede_queued(self, execution_id: str, now: dt.datetime) -> bool:
        """Release the dedup key of a queued execution so that it is never claimed."""
        result = self._run("supersede_queued", lambda: self.collection.update_one(
            {"executionId": execution_id, "active": True, "status": QUEUED},
            {"$set": {"active": False, "superseded": True, "updatedAt": now}},
        ))
        return result.modified_count == 1

    def claim(
        self,
        execution_id: str,
        *,
        worker: Mapping[str, Any],
        now: dt.datetime,
        lease_expires_at: dt.datetime,
    ) -> Claim:
        """Move a queued execution to processing, or take over a lapsed one.

        Exactly one of several concurrent claimants succeeds. The common case
        is one conditional update. When the execution is processing and its
        lease has lapsed because its worker died, the lapsed attempt is closed
        as ``failed``. A new execution of the same taskId and attempt number
        then takes over, marked as a redelivery, and later deliveries of the
        same message follow ``redeliveredAs`` to it.
        """
        update = {
            "status": PROCESSING,
            "worker": dict(worker),
            "startedAt": now,
            "updatedAt": now,
            "leaseExpiresAt": lease_expires_at,
        }
        queued = self._run("claim", lambda: self.collection.update_one(
            {"executionId": execution_id, "status": QUEUED, "superseded": {"$ne": True}},
            {"$set": update},
        ))
        if queued.matched_count:
            return Claim(execution_id)

        current = execution_id
        record: Document | None = None
        closed: Document | None = None
        for _ in range(_MAX_REDELIVERY_HOPS):
            record = self.get(current)
            if record is None:
                if closed is not None:
                    return self._insert_missing_successor(closed, current, update, now)
                return Claim(None, {})
            lapsed = (record.get("status") == PROCESSING and not record.get("superseded")
                      and record.get("leaseExpiresAt", now) < now)
            if lapsed:
                taken = self._take_over(record, update, now)
                if taken is not None:
                    return taken
                continue
            if record.get("redeliveredAs"):
                closed = record
                current = record["redeliveredAs"]
                continue
            return Claim(None, record)
        return Claim(None, record or {})

    def _take_over(
        self, record: Document, update: Mapping[str, Any], now: dt.datetime,
    ) -> Claim | None:
        # Returns None when another claimant retired the record first, so the
        # caller reads it again and follows redeliveredAs.
        new_id = new_execution_id()
        retired = self._run("retire_lapsed", lambda: self.collection.update_one(
            {"executionId": record["executionId"], "status": PROCESSING,
             "leaseExpiresAt": {"$lt": now}},
            {"$set": {"status": FAILED, "active": False, "completedAt": now,
                      "finishedAt": now, "updatedAt": now,
                      "errorCategory": "transient", "errorType": LEASE_LAPSED,
                      "errorMessage": "the worker stopped renewing the lease (lost or "
                                      f"killed); redelivered as executionId {new_id}",
                      "redeliveredAs": new_id,
                      "redeliveryHoldsKey": bool(record.get("active"))},
             "$unset": {"leaseExpiresAt": ""}},
        ))
        if not retired.matched_count:
            return None
        return self._insert_successor(record, new_id, update, now)

    def _insert_missing_successor(
        self, closed: Document, new_id: str, update: Mapping[str, Any], now: dt.datetime,
    ) -> Claim:
        # The lapsed attempt was closed but its successor never inserted,
        # because the store or the claimant went away between the two writes.
        # Insert it now, unless a newer execution of the taskId was sent since.
        newer = self._run("find_newer", lambda: self.collection.find_one(
            {"taskId": closed["taskId"], "createdAt": {"$gt": closed["createdAt"]}},
            {"_id": 0}, sort=[("createdAt", -1)],
        ))
        if newer is not None:
            return Claim(None, newer)
        return self._insert_successor(closed, new_id, update, now)

    def _insert_successor(
        self, lapsed: Document, new_id: str, update: Mapping[str, Any], now: dt.datetime,
    ) -> Claim:
        # *lapsed* is read before or after it was closed; once closed, its
        # own active flag is False and redeliveryHoldsKey keeps the old one.
        successor = {key: lapsed[key] for key in _INHERITED if key in lapsed}
        successor.update(update)
        successor.update({
            "executionId": new_id, "createdAt": now, "redelivered": True,
            "redeliveryOf": lapsed["executionId"],
            "active": bool(lapsed.get("redeliveryHoldsKey", lapsed.get("active"))),
            "dedupExpiresAt": now + dt.timedelta(seconds=self.config.dedup_window),
        })
        try:
            inserted = self.insert(successor)
        except DuplicateKeyError:
            # Another claimant inserted the same successor first.
            return Claim(None, self.get(new_id) or lapsed)
        if not inserted:
            # The dedup key was taken between the two writes by a new send,
            # which will do the work.
            return Claim(None, self.find_active(lapsed["taskId"]) or lapsed)
        return Claim(new_id, None, redelivered=True)

    def note_duplicate_delivery(
        self, execution_id: str, now: dt.datetime, *, counter: str = "duplicateDeliveries",
    ) -> None:
        """Count a delivery that was skipped because its execution cannot be claimed.

        Observe mode counts on ``wouldSkipDeliveries`` instead.
        """
        self._run("note_duplicate_delivery", lambda: self.collection.update_one(
            {"executionId": execution_id},
            {"$inc": {counter: 1}, "$set": {"lastDuplicateDeliveryAt": now}},
        ))

    def complete(
        self, execution_id: str, *, now: dt.datetime, runtime_ms: float, result: str | None,
    ) -> bool:
        """Record success of a processing execution and release its dedup key."""
        outcome = self._run("complete", lambda: self.collection.update_one(
            {"executionId": execution_id, "status": PROCESSING},
            {"$set": {"status": COMPLETED, "active": False, "completedAt": now,
                      "finishedAt": now,
                      "updatedAt": now, "runtimeMs": runtime_ms, "result": result},
             "$unset": {"leaseExpiresAt": ""}},
        ))
        return outcome.matched_count == 1

    def fail(
        self,
        execution_id: str,
        *,
        now: dt.datetime,
        error: Mapping[str, Any],
        status: str = FAILED,
        runtime_ms: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Record a failed attempt (``failed`` or ``dlq``) and release its dedup key.

        Applies to an execution that is queued or processing, and also moves a
        ``failed`` one to ``dlq`` when an exhausted retry is dead-lettered.
        """
        allowed = [QUEUED, PROCESSING] + ([FAILED] if status == DLQ else [])
        fields = {"status": status, "active": False, "completedAt": now, "updatedAt": now,
                  **error, **(extra or {})}
        if status != DLQ:
            fields["finishedAt"] = now
        if runtime_ms is not None:
            fields["runtimeMs"] = runtime_ms
        outcome = self._run("fail", lambda: self.collection.update_one(
            {"executionId": execution_id, "status": {"$in": allowed}},
            {"$set": fields, "$unset": {"leaseExpiresAt": ""}},
        ))
        return outcome.matched_count == 1

    def requeue(self, execution_id: str, *, now: dt.datetime) -> bool:
        """Move a processing execution back to queued, as a requeued message needs."""
        outcome = self._run("requeue", lambda: self.collection.update_one(
            {"executionId": execution_id, "status": PROCESSING},
            {"$set": {"status": QUEUED, "updatedAt": now}, "$unset": {"leaseExpiresAt": ""}},
        ))
        return outcome.matched_count == 1

    def archive(self, execution_id: str, *, now: dt.datetime, extra: Mapping[str, Any]) -> bool:
        """Move a ``dlq`` execution to ``archived``."""
        outcome = self._run("archive", lambda: self.collection.update_one(
            {"executionId": execution_id, "status": DLQ},
            {"$set": {"status": ARCHIVED, "updatedAt": now, "finishedAt": now, **extra}},
        ))
        return outcome.matched_count == 1

    def renew_leases(
        self, celery_task_ids: Iterable[str], *, hostname: str, lease_expires_at: dt.datetime,
    ) -> int:
        """Extend the leases of this worker's running executions in one write."""
        ids = list(celery_task_ids)
        if not ids:
            return 0
        outcome = self._run("renew_leases", lambda: self.collection.update_many(
            {"celeryTaskId": {"$in": ids}, "status": PROCESSING,
             "worker.hostname": hostname},
            {"$set": {"leaseExpiresAt": lease_expires_at}},
        ))
        return outcome.modified_count

    # -- reads ------------------------------------------------------------

    def get(self, execution_id: str) -> Document | None:
        """Return the record of one execution, or None."""
        return self._run("get", lambda: self.collection.find_one(
            {"executionId": execution_id}, {"_id": 0},
        ))

    def find_active(self, task_id: str) -> Document | None:
        """Return the execution that has the dedup key of *task_id*, or None."""
        return self._run("find_active", lambda: self.collection.find_one(
            {"taskId": task_id, "active": True}, {"_id": 0},
        ))

    def find_by_celery_id(
        self, celery_task_id: str, attempt: int | None = None,
    ) -> Document | None:
        """Return the latest execution sent with *celery_task_id*, or None."""
        query: dict[str, Any] = {"celeryTaskId": celery_task_id}
        if attempt is not None:
            query["attempt"] = attempt
        return self._run("find_by_celery_id", lambda: self.collection.find_one(
            query, {"_id": 0}, sort=[("createdAt", -1)],
        ))

    def history(self, task_id: str) -> list[Document]:
        """Return every execution of *task_id*, oldest first."""
        return self._run("history", lambda: list(self.collection.find(
            {"taskId": task_id}, {"_id": 0},
        ).sort([("createdAt", 1), ("attempt", 1)])))

    def counts_by_status(self, queue: str | None = None) -> dict[str, dict[str, int]]:
        """Return ``{queue: {status: count}}``, for one queue or all."""
        match: dict[str, Any] = {} if queue is None else {"queue": queue}
        pipeline = [
            {"$match": match},
            {"$group": {"_id": {"queue": "$queue", "status": "$status"}, "n": {"$sum": 1}}},
        ]
        counts: dict[str, dict[str, int]] = {}
        for row in self._run("counts", lambda: list(self.collection.aggregate(pipeline))):
            key = row["_id"]
            counts.setdefault(key.get("queue") or "", {})[key.get("status") or ""] = row["n"]
        return counts
