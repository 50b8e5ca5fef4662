"""Operations on the tracked executions: stats, tracing, stuck detection and the DLQ."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

from celery.utils import uuid
from celery.utils.log import get_logger
from kombu.exceptions import ContentDisallowed, DecodeError
from pymongo.errors import DuplicateKeyError, PyMongoError

from . import signals
from .dlq import dlq_queue
from .exceptions import StoreUnavailableError, TaskTrackerError
from .ids import new_execution_id
from .publish import HEADER, HEADER_VERSION, TaskKey, build_document
from .store.base import ARCHIVED, DLQ, FAILED, PROCESSING, QUEUED, utcnow

if TYPE_CHECKING:
    from .extension import TaskTracker
    from .store.mongo import Document

__all__ = [
    "DEAD_LETTER_PENDING",
    "DLQ_PUBLISH_FAILED",
    "LEASE_EXPIRED",
    "QUEUED_TOO_LONG",
    "REPLAY_STEPS",
    "REQUEUE_PENDING",
    "BrokerUnavailableError",
    "Counts",
    "DlqDepth",
    "DlqListing",
    "DlqOutcome",
    "DlqReport",
    "DlqSelection",
    "ExecutionNotFoundError",
    "Stats",
    "StuckExecution",
    "StuckOutcome",
    "Trace",
    "count_dlq_messages",
    "dead_letter_stuck",
    "dlq_queue_names",
    "find_stuck",
    "list_dlq",
    "parse_duration",
    "purge_dlq",
    "replay_dlq",
    "requeue_stuck",
    "show_dlq",
    "stats",
    "trace",
]

logger = get_logger(__name__)

T = TypeVar("T")

#: A processing execution whose lease lapsed: its worker died or lost MongoDB.
LEASE_EXPIRED = "lease_expired"
#: A queued execution that no worker claimed within the age limit.
QUEUED_TOO_LONG = "queued_too_long"
#: A finally failed execution whose DLQ publish failed: the worker kept its
#: arguments on the record but the task is on no queue.
DLQ_PUBLISH_FAILED = "dlq_publish_failed"
#: A requeue that stopped after reserving the new executionId; run it again.
REQUEUE_PENDING = "requeue_pending"
#: A stuck execution marked ``dlq`` whose DLQ message is not published yet.
DEAD_LETTER_PENDING = "dead_letter_pending"

#: ``dlqMessage`` values of an execution dead-lettered by :func:`dead_letter_stuck`.
_MESSAGE_PENDING = "pending"
_MESSAGE_PUBLISHED = "published"
_MESSAGE_NONE = "none"

#: Steps of one replayed message, in order, as passed to ``after_step``.
REPLAY_STEPS = ("reserved", "inserted", "published", "archived", "acked")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

#: Seconds to wait for the broker before reporting it unreachable.
_BROKER_TIMEOUT = 5.0


class ExecutionNotFoundError(TaskTrackerError, LookupError):
    """No execution record matches the given taskId, executionId or celery task id."""


class BrokerUnavailableError(TaskTrackerError):
    """The message broker could not be reached or rejected an operation."""


# -- durations ---------------------------------------------------------------


def parse_duration(text: str) -> dt.timedelta:
    """Parse a duration such as ``30s``, ``15m``, ``2h``, ``7d`` or ``1h30m``.

    Raises:
        ValueError: naming the value and the accepted form.
    """
    value = text.strip().lower()
    position = 0
    seconds = 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if not value or position != len(value):
        raise ValueError(
            f"invalid duration {text!r}: use a number followed by s, m, h or d, "
            "for example 30s, 15m, 2h, 7d or 1h30m"
        )
    return dt.timedelta(seconds=seconds)


# -- stats -------------------------------------------------------------------


@dataclasses.dataclass
class Counts:
    """Execution counts of one queue or one task name."""

    #: Records per status.
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Records per error category, over every status.
    categories: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Sends rejected as duplicates: the sum of ``deduplicatedSends``.
    deduplicated_sends: int = 0
    #: Deliveries skipped at claim time: the sum of ``duplicateDeliveries``.
    duplicate_deliveries: int = 0
    #: Sends that observe mode published but enforce mode would have rejected.
    would_deduplicate_sends: int = 0
    #: Deliveries that observe mode ran but enforce mode would have skipped.
    would_skip_deliveries: int = 0

    @property
    def total(self) -> int:
        """Number of records."""
        return sum(self.statuses.values())

    def as_dict(self) -> dict[str, Any]:
        """Return the counts as JSON-ready camelCase fields."""
        return {
            "total": self.total,
            "statuses": dict(self.statuses),
            "categories": dict(self.categories),
            "deduplicatedSends": self.deduplicated_sends,
            "duplicateDeliveries": self.duplicate_deliveries,
            "wouldDeduplicateSends": self.would_deduplicate_sends,
            "wouldSkipDeliveries": self.would_skip_deliveries,
        }


@dataclasses.dataclass
class DlqDepth:
    """Dead-lettered executions of one DLQ: records in MongoDB, messages on the broker."""

    queue: str
    #: Records with status ``dlq`` naming this DLQ.
    records: int
    #: Messages on the broker; ``None`` when the broker was unreachable.
    messages: int | None

    def as_dict(self) -> dict[str, Any]:
        """Return the depth as JSON-ready camelCase fields."""
        return {"queue": self.queue, "records": self.records, "messages": self.messages}


@dataclasses.dataclass
class Stats:
    """Counts of the recorded executions, per queue and per task name."""

    queue: str | None
    since: dt.datetime | None
    by_queue: dict[str, Counts]
    by_task: dict[str, Counts]
    dlq: list[DlqDepth]
    #: Why the DLQ message counts are missing, when the broker was unreachable.
    broker_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the stats as JSON-ready camelCase fields."""
        return {
            "queue": self.queue,
            "since": self.since,
            "queues": {name: counts.as_dict() for name, counts in self.by_queue.items()},
            "tasks": {name: counts.as_dict() for name, counts in self.by_task.items()},
            "dlq": [depth.as_dict() for depth in self.dlq],
            "brokerError": self.broker_error,
        }


def stats(
    tracker: TaskTracker,
    queue: str | None = None,
    since: dt.timedelta | dt.datetime | None = None,
) -> Stats:
    """Count the executions of one queue or all, optionally only those created since.

    One aggregation groups the records by queue, task name, status, error
    category and DLQ. The message count of each DLQ comes from a passive
    declare on the broker, so no queue is created. That count is taken at the
    time of the call and ignores *since*.
    """
    start = utcnow() - since if isinstance(since, dt.timedelta) else since
    match: dict[str, Any] = {}
    if queue is not None:
        match["queue"] = queue
    if start is not None:
        match["createdAt"] = {"$gte": start}
    pipeline: list[dict[str, Any]] = [
        {"$match": match},
        {"$group": {
            "_id": {"queue": "$queue", "taskName": "$taskName", "status": "$status",
                    "category": "$errorCategory", "dlqQueue": "$dlqQueue"},
            "records": {"$sum": 1},
            "deduplicatedSends": {"$sum": "$deduplicatedSends"},
            "duplicateDeliveries": {"$sum": "$duplicateDeliveries"},
            "wouldDeduplicateSends": {"$sum": "$wouldDeduplicateSends"},
            "wouldSkipDeliveries": {"$sum": "$wouldSkipDeliveries"},
        }},
    ]
    rows = _store_call(
        tracker, "stats", lambda: list(tracker.store.collection.aggregate(pipeline)),
    )

    by_queue: dict[str, Counts] = {}
    by_task: dict[str, Counts] = {}
    dlq_records: dict[str, int] = {}
    for row in rows:
        key = row["_id"]
        for name, table in ((key.get("queue"), by_queue), (key.get("taskName"), by_task)):
            _add_row(table.setdefault(name or "-", Counts()), key, row)
        if key.get("status") == DLQ and key.get("dlqQueue"):
            dlq_records[key["dlqQueue"]] = dlq_records.get(key["dlqQueue"], 0) + row["records"]

    # Every queue with records has a DLQ row, so an empty DLQ shows as 0.
    names = set(dlq_records)
    names.update(tracker.dlq_name(name) for name in by_queue if name != "-")
    if queue is not None:
        names.add(tracker.dlq_name(queue))
    messages, broker_error = _read_message_counts(tracker, sorted(names))
    depths = [
        DlqDepth(name, dlq_records.get(name, 0), messages.get(name) if messages else None)
        for name in sorted(names)
    ]
    return Stats(queue, start, dict(sorted(by_queue.items())), dict(sorted(by_task.items())),
                 depths, broker_error)


def _add_row(counts: Counts, key: Mapping[str, Any], row: Mapping[str, Any]) -> None:
    status = key.get("status") or "-"
    counts.statuses[status] = counts.statuses.get(status, 0) + row["records"]
    category = key.get("category")
    if category:
        counts.categories[category] = counts.categories.get(category, 0) + row["records"]
    counts.deduplicated_sends += int(row.get("deduplicatedSends") or 0)
    counts.duplicate_deliveries += int(row.get("duplicateDeliveries") or 0)
    counts.would_deduplicate_sends += int(row.get("wouldDeduplicateSends") or 0)
    counts.would_skip_deliveries += int(row.get("wouldSkipDeliveries") or 0)


def _read_message_counts(
    tracker: TaskTracker, names: Sequence[str],
) -> tuple[dict[str, int] | None, str | None]:
    try:
        with _broker(tracker) as connection:
            return {name: _message_count(connection, name) for name in names}, None
    except BrokerUnavailableError as exc:
        logger.warning("tasktracker: DLQ message counts unavailable: %s", exc)
        return None, str(exc)


def count_dlq_messages(tracker: TaskTracker, names: Iterable[str]) -> dict[str, int]:
    """Return the number of messages on each DLQ named in *names*.

    A queue missing on the broker counts as empty. Redis deletes the key of
    an empty list, so there an empty queue is missing too.

    Raises:
        BrokerUnavailableError: if the broker cannot be reached.
    """
    with _broker(tracker) as connection:
        return {name: _message_count(connection, name) for name in names}


@contextmanager
def _broker(tracker: TaskTracker) -> Iterator[Any]:
    """Connect to the app's broker, translating connection errors."""
    connection = tracker.app.connection_for_write()
    safe_uri = connection.as_uri()  # kombu masks the password here
    try:
        try:
            connection.ensure_connection(max_retries=1, timeout=_BROKER_TIMEOUT)
        except Exception as exc:
            raise BrokerUnavailableError(
                f"could not connect to the broker at {safe_uri}: {exc}; check that it is "
                "running and that broker_url is right"
            ) from exc
        try:
            yield connection
        except (*connection.connection_errors, *connection.channel_errors) as exc:
            raise BrokerUnavailableError(
                f"broker operation on {safe_uri} failed: {exc}"
            ) from exc
    finally:
        connection.release()


def _message_count(connection: Any, name: str) -> int:
    # A passive declare fails on an unknown queue and closes the channel on
    # RabbitMQ, so every queue gets its own channel.
    channel = connection.channel()
    try:
        return int(channel.queue_declare(queue=name, passive=True).message_count)
    except connection.channel_errors:
        return 0
    finally:
        with suppress(Exception):  # the broker may have closed it already
            channel.close()


# -- trace -------------------------------------------------------------------


@dataclasses.dataclass
class Trace:
    """The retry chain of one taskId, oldest execution first."""

    task_id: str
    #: Name of the identifier that the key matched: ``taskId``, ``executionId``
    #: or ``celeryTaskId``.
    matched: str
    executions: list[Document]

    def as_dict(self) -> dict[str, Any]:
        """Return the trace as JSON-ready camelCase fields."""
        return {"taskId": self.task_id, "matched": self.matched,
                "executions": self.executions}


def trace(tracker: TaskTracker, key: str) -> Trace:
    """Return every execution of the taskId that *key* names.

    *key* may be a taskId, an executionId or a celery task id; each is tried
    in that order with one indexed query.

    Raises:
        ExecutionNotFoundError: if no record matches *key*.
    """
    executions = tracker.history(key)
    if executions:
        return Trace(key, "taskId", executions)
    record = tracker.store.get(key)
    matched = "executionId"
    if record is None:
        record = tracker.store.find_by_celery_id(key)
        matched = "celeryTaskId"
    if record is None:
        raise ExecutionNotFoundError(
            f"no execution found for {key!r}: pass a taskId, an executionId or a celery "
            "task id as shown by `celery tasktracker dlq list` or Flower"
        )
    return Trace(record["taskId"], matched, tracker.history(record["taskId"]))


# -- stuck executions ----------------------------------------------------------


@dataclasses.dataclass
class StuckExecution:
    """An execution found by :func:`find_stuck`, with the reason it is stuck."""

    #: One of LEASE_EXPIRED, QUEUED_TOO_LONG, DLQ_PUBLISH_FAILED,
    #: REQUEUE_PENDING or DEAD_LETTER_PENDING.
    reason: str
    record: Document
    #: A queued execution created and due before this time counts as stuck.
    cutoff: dt.datetime

    def as_dict(self) -> dict[str, Any]:
        """Return the execution as JSON-ready fields: the reason and the record."""
        return {"reason": self.reason, **self.record}


@dataclasses.dataclass
class StuckOutcome:
    """Outcome of :func:`requeue_stuck` or :func:`dead_letter_stuck` for one execution."""

    #: ``requeued``, ``dead_lettered`` or ``skipped``.
    action: str
    task_id: str
    execution_id: str
    celery_task_id: str | None
    detail: str = ""
    new_execution_id: str | None = None
    new_celery_task_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the outcome as JSON-ready camelCase fields."""
        return {
            "action": self.action, "taskId": self.task_id, "executionId": self.execution_id,
            "celeryTaskId": self.celery_task_id, "detail": self.detail,
            "newExecutionId": self.new_execution_id,
            "newCeleryTaskId": self.new_celery_task_id,
        }


def find_stuck(
    tracker: TaskTracker,
    older_than: dt.timedelta,
    *,
    limit: int = 1000,
    now: dt.datetime | None = None,
) -> list[StuckExecution]:
    """Find executions that no worker will finish without help.

    Stuck executions are:

    - ``processing`` ones whose lease lapsed;
    - ``queued`` ones created and due (``notBefore``) more than *older_than* ago;
    - ``failed`` ones whose DLQ publish failed;
    - requeues and dead-letterings that an earlier call left half done.

    A superseded queued execution is not stuck, because a newer execution of
    its taskId replaced it. Each execution found is announced with the
    ``stuck_execution_found`` signal.

    NOTE: the ``dlq_publish_failed`` query walks the ``failed`` records of
    the status index, since no index covers ``dlqPending``.
    """
    now = now or utcnow()
    cutoff = now - older_than
    queries = (
        (LEASE_EXPIRED, _stuck_filter(LEASE_EXPIRED, now, cutoff)),
        (QUEUED_TOO_LONG, _stuck_filter(QUEUED_TOO_LONG, now, cutoff)),
        (DLQ_PUBLISH_FAILED, _stuck_filter(DLQ_PUBLISH_FAILED, now, cutoff)),
        (REQUEUE_PENDING, {"status": {"$in": [QUEUED, PROCESSING]},
                           "requeueExecutionId": {"$exists": True}}),
        (DEAD_LETTER_PENDING, {"status": DLQ, "dlqMessage": _MESSAGE_PENDING}),
    )
    found: list[StuckExecution] = []
    for reason, query in queries:
        remaining = limit - len(found)
        if remaining <= 0:
            break
        records = _find(tracker, query, sort=[("createdAt", 1)], limit=remaining)
        found.extend(StuckExecution(reason, record, cutoff) for record in records)

    for stuck in found:
        record = stuck.record
        signals.send_safely(
            signals.stuck_execution_found, _signal_sender(tracker, record),
            task_id=record.get("taskId"), execution_id=record.get("executionId"),
            celery_task_id=record.get("celeryTaskId"), status=record.get("status"),
        )
    return found


def _stuck_filter(reason: str, now: dt.datetime, cutoff: dt.datetime) -> dict[str, Any]:
    """Return the query that matches an execution still stuck for *reason*."""
    if reason == LEASE_EXPIRED:
        return {"status": PROCESSING, "leaseExpiresAt": {"$lt": now},
                "superseded": {"$ne": True}}
    if reason == DLQ_PUBLISH_FAILED:
        return {"status": FAILED, "dlqPending": True}
    return {
        "status": QUEUED, "superseded": {"$ne": True}, "createdAt": {"$lt": cutoff},
        "$or": [{"notBefore": {"$exists": False}}, {"notBefore": {"$lt": cutoff}}],
    }


def _stored_arguments(record: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]] | None:
    """Return the task arguments kept on *record*, or ``None`` when there are none.

    ``args``/``kwargs`` are stored when a task sets ``tracking_store_args``;
    ``pendingArgs``/``pendingKwargs`` are kept by a worker whose DLQ publish
    failed. Arguments with redacted values cannot be sent again.
    """
    if record.get("redactedArgs") and "pendingArgs" not in record:
        return None
    for args_field, kwargs_field in (("args", "kwargs"), ("pendingArgs", "pendingKwargs")):
        if args_field in record or kwargs_field in record:
            return list(record.get(args_field) or ()), dict(record.get(kwargs_field) or {})
    return None


def requeue_stuck(
    tracker: TaskTracker, stuck: Iterable[StuckExecution], *, now: dt.datetime | None = None,
) -> list[StuckOutcome]:
    """Send each stuck execution again as a new execution of the same taskId.

    The steps are:

    1. Reserve a new executionId and celery task id on the stuck record with
       a compare-and-set that also supersedes it, so no redelivery can claim
       it afterwards.
    2. Insert the new record.
    3. Publish the message.
    4. Mark the old record ``failed``.

    A call interrupted after step 1 leaves a ``requeue_pending`` record that
    the next call finishes. Publishing twice is harmless because the worker
    claims an executionId once.

    The task's arguments must be stored on the record; an execution without
    them is skipped. The new execution keeps the attempt number, as a
    redelivery does.
    """
    outcomes = []
    for item in stuck:
        if item.reason == DEAD_LETTER_PENDING:
            outcomes.append(_skipped(item.record, "being dead-lettered; run the "
                                                  "dead-letter action again to finish it"))
        elif item.reason == DLQ_PUBLISH_FAILED:
            outcomes.append(_skipped(item.record, "it failed finally and its DLQ publish "
                                                  "failed; use the dead-letter action"))
        else:
            outcomes.append(_requeue_one(tracker, item, now or utcnow()))
    return outcomes


def _requeue_one(tracker: TaskTracker, item: StuckExecution, now: dt.datetime) -> StuckOutcome:
    store = tracker.store
    record = item.record
    execution_id = record["executionId"]
    arguments = _stored_arguments(record)
    if arguments is None:
        return _skipped(record, "its arguments are not stored on the record, so it cannot "
                                "be sent again; send the task again from its producer")

    # Step 1: reserve, unless an interrupted call already did. Removing the
    # lease makes a redelivery of the old message a plain duplicate.
    reserved_execution_id = record.get("requeueExecutionId")
    if reserved_execution_id is not None:
        new_execution_id = str(reserved_execution_id)
        new_celery_task_id = str(record["requeueCeleryTaskId"])
    else:
        new_execution_id, new_celery_task_id = _new_ids()
        reserved = _store_call(tracker, "requeue_reserve", lambda: store.collection.update_one(
            {"executionId": execution_id, **_stuck_filter(item.reason, now, item.cutoff)},
            {"$set": {"requeueExecutionId": new_execution_id,
                      "requeueCeleryTaskId": new_celery_task_id, "superseded": True,
                      "active": False, "stuckReason": item.reason, "updatedAt": now},
             "$unset": {"leaseExpiresAt": ""}},
        ))
        if not reserved.matched_count:
            return _skipped(record, "no longer stuck: a worker claimed or finished it")

    # Step 2: the new record. Another active execution of the taskId makes
    # the requeue unnecessary.
    document = _new_execution(
        tracker, record, new_execution_id, new_celery_task_id,
        attempt=int(record.get("attempt") or 0), now=now,
        extra={"requeueOf": execution_id, "sentBy": "requeue",
               **{k: record[k] for k in ("args", "kwargs") if k in record}},
    )
    holder = _insert_new_execution(tracker, document, force=False, now=now)
    if holder is not None:
        _finish_requeue(tracker, record, new_execution_id, now, {
            "requeueSkippedFor": holder.get("executionId"),
            "errorMessage": f"stuck ({item.reason}); not requeued because executionId "
                            f"{holder.get('executionId')} of the taskId is active",
        })
        return _skipped(record, f"taskId is already {holder.get('status')} as executionId "
                                f"{holder.get('executionId')} (celery task id "
                                f"{holder.get('celeryTaskId')})")

    # Steps 3 and 4.
    args, kwargs = arguments
    header = {"v": HEADER_VERSION, "taskId": record["taskId"],
              "executionId": new_execution_id, "attempt": document["attempt"]}
    tracker.app.send_task(
        record["taskName"], args=args, kwargs=kwargs, task_id=new_celery_task_id,
        queue=document["queue"], retries=document["attempt"], headers={HEADER: header},
    )
    _finish_requeue(tracker, record, new_execution_id, now, {
        "requeuedAt": now,
        "errorMessage": f"stuck ({item.reason}); requeued as executionId {new_execution_id}",
    })
    logger.warning(
        "tasktracker: requeued stuck taskId=%s executionId=%s as executionId=%s "
        "(celery task id %s)", record["taskId"], execution_id, new_execution_id,
        new_celery_task_id,
    )
    return StuckOutcome("requeued", record["taskId"], execution_id, record.get("celeryTaskId"),
                        f"sent to {document['queue']}", new_execution_id, new_celery_task_id)


def _finish_requeue(
    tracker: TaskTracker, record: Document, new_execution_id: str, now: dt.datetime,
    fields: Mapping[str, Any],
) -> None:
    _store_call(tracker, "requeue_finish", lambda: tracker.store.collection.update_one(
        {"executionId": record["executionId"], "requeueExecutionId": new_execution_id,
         "status": {"$in": [QUEUED, PROCESSING]}},
        {"$set": {"status": FAILED, "completedAt": now, "finishedAt": now, "updatedAt": now,
                  **fields}},
    ))


def dead_letter_stuck(
    tracker: TaskTracker, stuck: Iterable[StuckExecution], *, now: dt.datetime | None = None,
) -> list[StuckOutcome]:
    """Mark each stuck execution ``dlq`` and, when its arguments are stored, publish it.

    The compare-and-set to ``dlq`` comes first and also supersedes the
    record, so a worker that claims it in the meantime wins and the record is
    left alone. The DLQ message carries the same tracking header as one
    from a worker (reason ``stuck``, or the original reason for a failed DLQ
    publish), so ``dlq replay`` can send it back. A call interrupted before
    the publish leaves a ``dead_letter_pending`` record that the next call
    finishes. Without stored arguments no message can be built: the record is
    marked ``dlq`` with ``dlqMessage: "none"`` and shows in ``dlq list`` only.
    """
    outcomes = []
    for item in stuck:
        if item.reason == REQUEUE_PENDING:
            outcomes.append(_skipped(item.record, "a requeue of it is in progress; run the "
                                                  "requeue action again to finish it"))
        else:
            outcomes.append(_dead_letter_one(tracker, item, now or utcnow()))
    return outcomes


def _dead_letter_one(
    tracker: TaskTracker, item: StuckExecution, now: dt.datetime,
) -> StuckOutcome:
    store = tracker.store
    record = item.record
    arguments = _stored_arguments(record)
    source = record.get("sourceQueue") or record.get("queue") \
        or str(tracker.app.conf.task_default_queue)
    dlq_name = record.get("dlqQueue") or tracker.dlq_name(source)

    if item.reason != DEAD_LETTER_PENDING:
        fields = _dead_letter_fields(item, now, has_arguments=arguments is not None)
        fields.update(dlqQueue=dlq_name, sourceQueue=source)
        marked = _store_call(tracker, "dead_letter_stuck", lambda: store.collection.update_one(
            {"executionId": record["executionId"],
             **_stuck_filter(item.reason, now, item.cutoff)},
            {"$set": fields, "$unset": {"leaseExpiresAt": ""}},
        ))
        if not marked.matched_count:
            return _skipped(record, "no longer stuck: a worker claimed or finished it")
        record = {**record, **fields}

    detail = "marked dlq; no DLQ message because its arguments are not stored"
    if arguments is not None:
        _publish_dead_letter(tracker, record, arguments, dlq_name, source, now)
        _store_call(tracker, "dead_letter_published", lambda: store.collection.update_one(
            {"executionId": record["executionId"], "dlqMessage": _MESSAGE_PENDING},
            {"$set": {"dlqMessage": _MESSAGE_PUBLISHED, "updatedAt": now}},
        ))
        detail = f"published to {dlq_name}"

    logger.warning("tasktracker: dead-lettered stuck taskId=%s executionId=%s: %s",
                   record["taskId"], record["executionId"], detail)
    signals.send_safely(
        signals.task_dead_lettered, _signal_sender(tracker, record),
        task_id=record["taskId"], execution_id=record["executionId"],
        celery_task_id=record.get("celeryTaskId"), reason=record.get("dlqReason"),
        dlq_queue=dlq_name,
    )
    return StuckOutcome("dead_lettered", record["taskId"], record["executionId"],
                        record.get("celeryTaskId"), detail)


def _dead_letter_fields(
    item: StuckExecution, now: dt.datetime, *, has_arguments: bool,
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "status": DLQ, "active": False, "superseded": True, "updatedAt": now,
        "dlqMessage": _MESSAGE_PENDING if has_arguments else _MESSAGE_NONE,
    }
    if item.reason == DLQ_PUBLISH_FAILED:
        # The error fields of the failed attempt stay as the worker wrote them.
        fields.update(dlqPending=False,
                      dlqReason=item.record.get("failureReason") or "not_retryable")
        return fields
    waited = "its lease lapsed" if item.reason == LEASE_EXPIRED else "it waited in its queue"
    fields.update(
        completedAt=now, stuckReason=item.reason, dlqReason="stuck",
        errorCategory="unknown",
        errorMessage=f"stuck ({item.reason}): dead-lettered by an operator after {waited}",
    )
    return fields


def _publish_dead_letter(
    tracker: TaskTracker,
    record: Mapping[str, Any],
    arguments: tuple[list[Any], dict[str, Any]],
    dlq_name: str,
    source: str,
    now: dt.datetime,
) -> None:
    # The header layout of the worker's dead_letter(), so replay reads both.
    header = {
        "v": HEADER_VERSION, "taskId": record["taskId"], "executionId": record["executionId"],
        "dlq": {
            "reason": record.get("dlqReason"), "category": record.get("errorCategory"),
            "errorType": record.get("errorType"), "errorMessage": record.get("errorMessage"),
            "sourceQueue": source, "attempts": int(record.get("attempt") or 0) + 1,
            "failedAt": now.isoformat(), "celeryTaskId": record.get("celeryTaskId"),
        },
    }
    args, kwargs = arguments
    tracker.app.send_task(
        record["taskName"], args=args, kwargs=kwargs, task_id=record.get("celeryTaskId"),
        queue=dlq_queue(dlq_name), headers={HEADER: header},
    )


def _skipped(record: Mapping[str, Any], detail: str) -> StuckOutcome:
    return StuckOutcome("skipped", record["taskId"], record["executionId"],
                        record.get("celeryTaskId"), detail)


# -- DLQ records -----------------------------------------------------------------


@dataclasses.dataclass
class DlqListing:
    """A page of dead-lettered records, newest first, and how many match in all."""

    records: list[Document]
    total: int

    def as_dict(self) -> dict[str, Any]:
        """Return the listing as JSON-ready fields."""
        return {"total": self.total, "records": self.records}


def list_dlq(
    tracker: TaskTracker,
    *,
    task_name: str | None = None,
    task_id: str | None = None,
    category: str | None = None,
    queue: str | None = None,
    older_than: dt.timedelta | None = None,
    newer_than: dt.timedelta | None = None,
    limit: int = 100,
) -> DlqListing:
    """List records with status ``dlq``, newest dead-lettering first.

    *queue* is the source queue; the ages count from the time the execution
    was dead-lettered (``completedAt``). Tracebacks are left out; use
    :func:`show_dlq` for one record in full.
    """
    query: dict[str, Any] = {"status": DLQ}
    if task_name is not None:
        query["taskName"] = task_name
    if task_id is not None:
        query["taskId"] = task_id
    if category is not None:
        query["errorCategory"] = category.lower()
    if queue is not None:
        query["queue"] = queue
    now = utcnow()
    ages: dict[str, Any] = {}
    if older_than is not None:
        ages["$lte"] = now - older_than
    if newer_than is not None:
        ages["$gte"] = now - newer_than
    if ages:
        query["completedAt"] = ages

    store = tracker.store
    records = _find(tracker, query, sort=[("completedAt", -1)], limit=limit,
                    projection={"_id": 0, "traceback": 0})
    total = _store_call(tracker, "count_dlq", lambda: store.collection.count_documents(query))
    return DlqListing(records, total)


def show_dlq(tracker: TaskTracker, key: str) -> Document:
    """Return one dead-lettered or archived record in full, traceback included.

    *key* is an executionId; a taskId or a celery task id selects the latest
    dead-lettered or archived execution of it.

    Raises:
        ExecutionNotFoundError: if nothing matches *key*.
    """
    store = tracker.store
    record = store.get(key)
    if record is None:
        finished = {"status": {"$in": [DLQ, ARCHIVED]}}
        for field in ("taskId", "celeryTaskId"):
            found = _find(tracker, {field: key, **finished}, sort=[("createdAt", -1)], limit=1)
            if found:
                record = found[0]
                break
    if record is None:
        raise ExecutionNotFoundError(
            f"no dead-lettered execution found for {key!r}: pass an executionId, taskId "
            "or celery task id from `celery tasktracker dlq list`"
        )
    return record


# -- DLQ messages: replay and purge ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DlqSelection:
    """Selection of the DLQ messages that a replay or purge acts on."""

    all: bool = False
    task_ids: tuple[str, ...] = ()
    execution_ids: tuple[str, ...] = ()
    #: Source queue whose DLQ is read; ``None`` reads every known DLQ.
    queue: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` unless the selection names what to act on."""
        if not (self.all or self.task_ids or self.execution_ids):
            raise ValueError("no messages selected: pass --all, or one or more "
                             "--task-id or --execution-id values")
        if self.all and (self.task_ids or self.execution_ids):
            raise ValueError("--all cannot be combined with --task-id or --execution-id")

    def matches(self, header: Mapping[str, Any]) -> bool:
        """Return whether the message with tracking *header* is selected."""
        if self.all:
            return True
        return (header.get("executionId") in self.execution_ids
                or header.get("taskId") in self.task_ids)


@dataclasses.dataclass
class DlqOutcome:
    """Outcome of a replay or purge for one DLQ message."""

    #: ``replayed``, ``purged``, ``acked`` (record already archived),
    #: ``skipped`` (left on the DLQ), or ``would_replay``/``would_purge``/
    #: ``would_ack`` in a dry run.
    action: str
    dlq_queue: str
    task_name: str | None
    task_id: str | None
    #: The dead-lettered execution.
    execution_id: str | None
    #: The celery task id of the DLQ message, which is the failed execution's.
    celery_task_id: str | None
    detail: str = ""
    new_execution_id: str | None = None
    new_celery_task_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the outcome as JSON-ready camelCase fields."""
        return {
            "action": self.action, "dlqQueue": self.dlq_queue, "taskName": self.task_name,
            "taskId": self.task_id, "executionId": self.execution_id,
            "celeryTaskId": self.celery_task_id, "detail": self.detail,
            "newExecutionId": self.new_execution_id,
            "newCeleryTaskId": self.new_celery_task_id,
        }


@dataclasses.dataclass
class DlqReport:
    """The result of a replay or purge run."""

    outcomes: list[DlqOutcome]
    #: Messages taken off the DLQs, selected or not.
    scanned: int
    #: Selected executionIds and taskIds that no scanned message carried.
    not_found: list[str]

    def count(self, action: str) -> int:
        """Return how many messages ended with *action*."""
        return sum(1 for outcome in self.outcomes if outcome.action == action)

    def as_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready camelCase fields."""
        return {"scanned": self.scanned, "notFound": self.not_found,
                "outcomes": [outcome.as_dict() for outcome in self.outcomes]}


@dataclasses.dataclass
class _Message:
    """A DLQ message taken off the queue and not yet acknowledged."""

    raw: Any
    queue: str
    header: dict[str, Any]

    @property
    def task_name(self) -> str | None:
        name = (self.raw.headers or {}).get("task")
        return str(name) if name else None

    def outcome(self, action: str, detail: str = "", **extra: Any) -> DlqOutcome:
        dlq = self.header.get("dlq") or {}
        return DlqOutcome(
            action, self.queue, self.task_name, self.header.get("taskId"),
            self.header.get("executionId"),
            dlq.get("celeryTaskId") or (self.raw.headers or {}).get("id"), detail, **extra,
        )


def dlq_queue_names(tracker: TaskTracker, selection: DlqSelection) -> list[str]:
    """Return the DLQs a replay or purge of *selection* reads.

    These are the DLQ of ``selection.queue`` when it is set. Otherwise they
    are the DLQs named by the selected records (by every ``dlq`` record for
    ``--all``) plus the DLQs of the default queue and of ``task_queues``, so
    a message whose record is gone is still found.
    """
    if selection.queue is not None:
        return [tracker.dlq_name(selection.queue)]
    if selection.all:
        query: dict[str, Any] = {"status": DLQ}
    else:
        query = {"$or": [{"executionId": {"$in": list(selection.execution_ids)}},
                         {"taskId": {"$in": list(selection.task_ids)}}]}
    collection = tracker.store.collection
    named = _store_call(tracker, "dlq_queue_names", lambda: collection.distinct(
        "dlqQueue", query,
    ))
    names = {str(name) for name in named if name}
    names.add(tracker.dlq_name(str(tracker.app.conf.task_default_queue)))
    suffix = tracker.config.dlq_suffix
    for queue in tracker.app.conf.task_queues or ():
        if not queue.name.endswith(suffix):
            names.add(tracker.dlq_name(queue.name))
    return sorted(names)


def replay_dlq(
    tracker: TaskTracker,
    selection: DlqSelection,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    force: bool = False,
    progress: Callable[[], None] | None = None,
    after_step: Callable[[str, DlqOutcome], None] | None = None,
) -> DlqReport:
    """Send dead-lettered tasks back to their source queues as new executions.

    Each selected message goes through these steps:

    1. Reserve a new executionId and celery task id on the ``dlq`` record
       with a compare-and-set, or reuse the reservation of an interrupted run.
    2. Insert the new ``queued`` record with ``replayOf``.
    3. Publish the task with a tracking header naming the new executionId.
    4. Archive the ``dlq`` record.
    5. Acknowledge the message.

    A crash between two steps leaves the message on the DLQ, and the next run
    resumes with the same ids. A repeated publish runs the body once,
    because the worker claims an executionId once. A message whose record is
    already archived is only acknowledged.

    When another execution of the taskId is active, the message is skipped
    and stays on the DLQ, unless *force* is set. A forced replay does not take
    part in deduplication. Messages that are not selected or are skipped go
    back to the DLQ at the end. At most *limit* messages are replayed, and
    only messages on the DLQ when the run starts are read.

    *progress* is called once per message taken off a DLQ. *after_step* is
    called after each step of a replayed message with the step name from
    ``REPLAY_STEPS``; an exception it raises stops the run there, which
    tests use to simulate a crash.

    Raises:
        ValueError: if *selection* selects nothing.
        BrokerUnavailableError: if the broker cannot be reached.
    """
    selection.validate()

    def handle(message: _Message) -> DlqOutcome:
        return _replay_message(tracker, message, dry_run=dry_run, force=force,
                               after_step=after_step)

    return _process_dlq(tracker, selection, handle, limit=limit, progress=progress,
                        done=("replayed", "would_replay"))


def purge_dlq(
    tracker: TaskTracker,
    selection: DlqSelection,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    progress: Callable[[], None] | None = None,
) -> DlqReport:
    """Delete selected messages from the DLQs and archive their records.

    Each record is archived before its message is acknowledged, so a crash in
    between leaves a message whose record is archived, which the next replay
    or purge only acknowledges. A message whose record is missing is
    acknowledged as well. Selected ``dlq`` records that never had a message
    (``dlqMessage: "none"``, from :func:`dead_letter_stuck`) are archived too.

    Raises:
        ValueError: if *selection* selects nothing.
        BrokerUnavailableError: if the broker cannot be reached.
    """
    selection.validate()

    def handle(message: _Message) -> DlqOutcome:
        return _purge_message(tracker, message, dry_run=dry_run)

    done = ("purged", "would_purge")
    report = _process_dlq(tracker, selection, handle, limit=limit, progress=progress,
                          done=done)
    remaining = None if limit is None else limit - sum(report.count(a) for a in done)
    if remaining is None or remaining > 0:
        _purge_records_without_message(tracker, selection, report, remaining, dry_run)
    return report


def _purge_records_without_message(
    tracker: TaskTracker, selection: DlqSelection, report: DlqReport, limit: int | None,
    dry_run: bool,
) -> None:
    query: dict[str, Any] = {"status": DLQ, "dlqMessage": _MESSAGE_NONE}
    if selection.queue is not None:
        query["queue"] = selection.queue
    if not selection.all:
        query["$or"] = [{"executionId": {"$in": list(selection.execution_ids)}},
                        {"taskId": {"$in": list(selection.task_ids)}}]
    for record in _find(tracker, query, sort=[("createdAt", 1)], limit=limit or 0):
        outcome = DlqOutcome(
            "would_purge" if dry_run else "purged", str(record.get("dlqQueue")),
            record.get("taskName"), record["taskId"], record["executionId"],
            record.get("celeryTaskId"), "record without a DLQ message",
        )
        if not dry_run:
            now = utcnow()
            tracker.store.archive(record["executionId"], now=now,
                                  extra={"archiveReason": "purged", "purgedAt": now})
        report.outcomes.append(outcome)
        report.not_found = [key for key in report.not_found
                            if key not in (record["taskId"], record["executionId"])]


def _process_dlq(
    tracker: TaskTracker,
    selection: DlqSelection,
    handle: Callable[[_Message], DlqOutcome],
    *,
    limit: int | None,
    progress: Callable[[], None] | None,
    done: tuple[str, ...],
) -> DlqReport:
    """Take messages off each DLQ, hand the selected ones to *handle*.

    A message that *handle* does not acknowledge, and every message that is
    not selected, stays unacknowledged until the DLQ has been read, so it is
    not read twice, and then goes back to the queue. If the process dies
    instead, the broker returns them too: RabbitMQ when the connection
    drops, Redis after the transport's visibility timeout.
    """
    outcomes: list[DlqOutcome] = []
    scanned = 0
    seen: set[str] = set()
    names = dlq_queue_names(tracker, selection)
    accept = list(tracker.app.conf.accept_content or ["json"])
    with _broker(tracker) as connection:
        for name in names:
            # Only the messages present now: a replayed task that fails again
            # comes back to the DLQ during the run and must not loop.
            budget = _message_count(connection, name)
            channel = connection.channel()
            unacked: list[Any] = []
            try:
                queue = dlq_queue(name).bind(channel)  # type: ignore[no-untyped-call]
                for _ in range(budget):
                    if limit is not None and sum(o.action in done for o in outcomes) >= limit:
                        break
                    raw = queue.get(no_ack=False, accept=accept)
                    if raw is None:
                        break
                    scanned += 1
                    if progress is not None:
                        progress()
                    message = _Message(raw, name, _tracking_header(raw))
                    if not message.header or not selection.matches(message.header):
                        unacked.append(raw)
                        continue
                    seen.update(str(message.header.get(k)) for k in ("taskId", "executionId"))
                    outcome = handle(message)
                    outcomes.append(outcome)
                    if not raw.acknowledged:
                        unacked.append(raw)
            finally:
                _return_messages(unacked)
                channel.close()

    selected_ids = [*selection.task_ids, *selection.execution_ids]
    return DlqReport(outcomes, scanned, [key for key in selected_ids if key not in seen])


def _tracking_header(raw: Any) -> dict[str, Any]:
    header = (raw.headers or {}).get(HEADER)
    if not isinstance(header, dict) or not header.get("executionId") or not header.get("taskId"):
        return {}
    return header


def _return_messages(unacked: Sequence[Any]) -> None:
    for raw in unacked:
        try:
            raw.requeue()
        except Exception:
            # Closing the channel returns it as well.
            logger.debug("tasktracker: could not requeue a DLQ message", exc_info=True)


def _replay_message(
    tracker: TaskTracker,
    message: _Message,
    *,
    dry_run: bool,
    force: bool,
    after_step: Callable[[str, DlqOutcome], None] | None,
) -> DlqOutcome:
    store = tracker.store
    execution_id = str(message.header["executionId"])
    record = store.get(execution_id)
    if record is not None and record.get("status") == ARCHIVED:
        if dry_run:
            return message.outcome("would_ack", "record already archived")
        message.raw.ack()
        return message.outcome("acked", "record already archived")
    if record is not None and record.get("status") != DLQ:
        return message.outcome("skipped", f"record status is {record.get('status')!r}, "
                                          "expected 'dlq'; the worker may still be writing it")
    if message.task_name is None:
        return message.outcome("skipped", "message has no task name header")
    try:
        args, kwargs = _message_arguments(message.raw)
    except (ContentDisallowed, DecodeError, ValueError) as exc:
        return message.outcome("skipped", f"message body cannot be read: {exc}")

    holder = None if force else _blocking_holder(
        tracker, str(message.header["taskId"]), (record or {}).get("replayExecutionId"),
        dry_run=dry_run,
    )
    if holder is not None:
        return message.outcome(
            "skipped", f"taskId is {holder.get('status')} as executionId "
                       f"{holder.get('executionId')} (celery task id "
                       f"{holder.get('celeryTaskId')}); use --force to replay anyway")
    if dry_run:
        return message.outcome("would_replay", f"to {_source_queue(tracker, message, record)}")

    if record is None:
        record = _restore_record(tracker, message)
    return _replay_steps(tracker, message, record, args, kwargs, force, after_step)


def _blocking_holder(
    tracker: TaskTracker, task_id: str, own_execution_id: str | None, *, dry_run: bool,
) -> Document | None:
    """Return the active execution of *task_id* that a replay must not run beside.

    A resumed replay whose own new record has the dedup key is not blocked.
    A stale holder does not block either. A real run supersedes it, as any
    send does, and a dry run only checks its times.
    """
    holder = tracker.store.find_active(task_id)
    if holder is None or holder.get("executionId") == own_execution_id:
        return None
    now = utcnow()
    if dry_run:
        expiry = {QUEUED: "dedupExpiresAt", PROCESSING: "leaseExpiresAt"}.get(
            str(holder.get("status")))
        deadline = holder.get(expiry) if expiry else None
        stale = isinstance(deadline, dt.datetime) and deadline < now
    else:
        stale = tracker.store.supersede_if_stale(holder, now)
    return None if stale else holder


def _replay_steps(
    tracker: TaskTracker,
    message: _Message,
    record: Document,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    force: bool,
    after_step: Callable[[str, DlqOutcome], None] | None,
) -> DlqOutcome:
    store = tracker.store
    execution_id = record["executionId"]
    now = utcnow()

    # Step 1: reserve the ids, or resume with the ones already reserved.
    reservation = _reserve_replay(tracker, record, now)
    if reservation is None:
        message.raw.ack()
        return message.outcome("acked", "record archived by a concurrent run")
    new_execution_id, new_celery_task_id = reservation
    done = message.outcome("replayed", "", new_execution_id=new_execution_id,
                           new_celery_task_id=new_celery_task_id)
    _step(after_step, "reserved", done)

    # Step 2: the new record.
    source = _source_queue(tracker, message, record)
    existing = store.get(new_execution_id)
    if existing is None:
        document = _new_execution(
            tracker, record, new_execution_id, new_celery_task_id, attempt=0, now=now,
            queue=source, extra={"replayOf": execution_id, "sentBy": "replay"},
        )
        holder = _insert_new_execution(tracker, document, force=force, now=now)
        if holder is not None:
            return message.outcome(
                "skipped", f"taskId became {holder.get('status')} as executionId "
                           f"{holder.get('executionId')}; use --force to replay anyway")
    _step(after_step, "inserted", done)

    # Step 3: publish, unless a worker already claimed the new execution.
    done.detail = f"to {source}"
    if existing is None or existing.get("status") == QUEUED:
        header = {"v": HEADER_VERSION, "taskId": record["taskId"],
                  "executionId": new_execution_id, "attempt": 0}
        tracker.app.send_task(message.task_name, args=args, kwargs=kwargs,
                              task_id=new_celery_task_id, queue=source,
                              headers={HEADER: header})
    else:
        done.detail += f"; not published again: the execution is {existing.get('status')}"
    _step(after_step, "published", done)

    # Steps 4 and 5.
    store.archive(execution_id, now=utcnow(), extra={"archiveReason": "replayed",
                                                     "replayedAt": utcnow()})
    _step(after_step, "archived", done)
    message.raw.ack()
    _step(after_step, "acked", done)

    logger.info(
        "tasktracker: replayed taskId=%s executionId=%s as executionId=%s (celery task id "
        "%s) to %s", record["taskId"], execution_id, new_execution_id, new_celery_task_id,
        source,
    )
    signals.send_safely(
        signals.task_replayed, _signal_sender(tracker, record), task_id=record["taskId"],
        execution_id=new_execution_id, replay_of=execution_id,
        celery_task_id=new_celery_task_id,
    )
    return done


def _reserve_replay(
    tracker: TaskTracker, record: Document, now: dt.datetime,
) -> tuple[str, str] | None:
    """Reserve the replay's ids on the ``dlq`` record; ``None`` if it is archived."""
    store = tracker.store
    execution_id = record["executionId"]
    new_execution_id, new_celery_task_id = _new_ids()
    reserved = _store_call(tracker, "replay_reserve", lambda: store.collection.update_one(
        {"executionId": execution_id, "status": DLQ, "replayExecutionId": {"$exists": False}},
        {"$set": {"replayExecutionId": new_execution_id,
                  "replayCeleryTaskId": new_celery_task_id, "replayReservedAt": now,
                  "updatedAt": now}},
    ))
    if reserved.matched_count:
        return new_execution_id, new_celery_task_id
    current = store.get(execution_id) or {}
    if current.get("status") != DLQ or not current.get("replayExecutionId"):
        return None
    return str(current["replayExecutionId"]), str(current["replayCeleryTaskId"])


def _purge_message(tracker: TaskTracker, message: _Message, *, dry_run: bool) -> DlqOutcome:
    store = tracker.store
    record = store.get(str(message.header["executionId"]))
    status = (record or {}).get("status")
    if record is not None and status not in (DLQ, ARCHIVED):
        return message.outcome("skipped", f"record status is {status!r}, expected 'dlq'")
    if dry_run:
        return message.outcome("would_purge")
    if record is not None and status == DLQ:
        now = utcnow()
        store.archive(record["executionId"], now=now,
                      extra={"archiveReason": "purged", "purgedAt": now})
    message.raw.ack()
    detail = "record already archived" if status == ARCHIVED else (
        "no record" if record is None else "record archived")
    return message.outcome("purged", detail)


# -- helpers shared by replay and requeue ----------------------------------------


def _new_ids() -> tuple[str, str]:
    """Return a new executionId and a new celery task id for a re-sent task."""
    return new_execution_id(), uuid()


def _new_execution(
    tracker: TaskTracker,
    record: Mapping[str, Any],
    execution_id: str,
    celery_task_id: str,
    *,
    attempt: int,
    now: dt.datetime,
    extra: Mapping[str, Any],
    queue: str | None = None,
) -> Document:
    key = TaskKey(record["taskId"], tuple(record.get("keyParts") or ()))
    document = build_document(
        key=key, task_name=record["taskName"], celery_task_id=celery_task_id,
        queue=queue or record.get("queue") or str(tracker.app.conf.task_default_queue),
        attempt=attempt, now=now, dedup_window=tracker.config.dedup_window, extra=extra,
    )
    document["executionId"] = execution_id
    return document


def _insert_new_execution(
    tracker: TaskTracker, document: Document, *, force: bool, now: dt.datetime,
) -> Document | None:
    """Insert *document*; return the active execution that blocks it, or ``None``.

    An existing record with the same executionId counts as inserted, since
    an interrupted run inserted it. A stale holder of the dedup key is
    superseded first, as for any send. *force* inserts a record that does not
    hold the key.
    """
    store = tracker.store
    if force:
        document.update(active=False, forced=True)
    for _ in range(2):
        try:
            if store.insert(document):
                return None
        except DuplicateKeyError:
            return None
        holder = store.find_active(document["taskId"])
        if holder is None:
            continue
        if holder.get("executionId") == document["executionId"]:
            return None
        if not store.supersede_if_stale(holder, now):
            return holder
    return store.find_active(document["taskId"])


def _restore_record(tracker: TaskTracker, message: _Message) -> Document:
    """Recreate the ``dlq`` record of a message whose record was removed.

    Retention deletes finished records, dead-lettered ones included, while
    their message may still be on the DLQ; replay needs a record for its
    compare-and-set.
    """
    header = message.header
    dlq = header.get("dlq") or {}
    now = utcnow()
    record: Document = {
        "taskId": header["taskId"], "executionId": header["executionId"],
        "celeryTaskId": dlq.get("celeryTaskId") or (message.raw.headers or {}).get("id"),
        "taskName": message.task_name, "queue": dlq.get("sourceQueue"),
        "attempt": max(int(dlq.get("attempts") or 1) - 1, 0), "status": DLQ,
        "active": False, "createdAt": now, "updatedAt": now, "completedAt": now,
        "errorCategory": dlq.get("category"), "errorType": dlq.get("errorType"),
        "errorMessage": dlq.get("errorMessage"), "dlqReason": dlq.get("reason"),
        "dlqQueue": message.queue, "sourceQueue": dlq.get("sourceQueue"),
        "restoredFromMessage": True,
    }
    with suppress(DuplicateKeyError):
        tracker.store.insert(dict(record))
    logger.info("tasktracker: restored the dlq record of taskId=%s executionId=%s from its "
                "DLQ message", record["taskId"], record["executionId"])
    return tracker.store.get(record["executionId"]) or record


def _source_queue(tracker: TaskTracker, message: _Message, record: Document | None) -> str:
    dlq = message.header.get("dlq") or {}
    source = dlq.get("sourceQueue") or (record or {}).get("sourceQueue") \
        or (record or {}).get("queue") or tracker.app.conf.task_default_queue
    return str(source)


def _message_arguments(raw: Any) -> tuple[Sequence[Any], Mapping[str, Any]]:
    # Decoding honours accept_content, so a pickled body from an untrusted
    # producer raises ContentDisallowed instead of being loaded.
    body = raw.decode()
    # Task message protocol 2: (args, kwargs, embed).
    if isinstance(body, list | tuple) and len(body) >= 2:
        return list(body[0] or ()), dict(body[1] or {})
    raise ValueError("it is not a task message of protocol 2")


def _step(
    after_step: Callable[[str, DlqOutcome], None] | None, name: str, outcome: DlqOutcome,
) -> None:
    if after_step is not None:
        after_step(name, outcome)


def _find(
    tracker: TaskTracker,
    query: Mapping[str, Any],
    *,
    sort: list[tuple[str, int]],
    limit: int,
    projection: Mapping[str, Any] | None = None,
) -> list[Document]:
    collection = tracker.store.collection
    return _store_call(tracker, "find", lambda: list(
        collection.find(query, projection or {"_id": 0}).sort(sort).limit(limit)
    ))


def _store_call(tracker: TaskTracker, name: str, operation: Callable[[], T]) -> T:
    """Run a query on the collection, wrapping driver errors as the store does."""
    try:
        return operation()
    except DuplicateKeyError:
        raise
    except PyMongoError as exc:
        raise StoreUnavailableError(
            f"tracking store operation {name!r} failed on {tracker.config.masked_uri}: {exc}"
        ) from exc


def _signal_sender(tracker: TaskTracker, record: Mapping[str, Any]) -> Any:
    # Signals are sent with the task as sender when it is registered here.
    return tracker.app.tasks.get(record.get("taskName") or "") or tracker.app
