"""Send-side tracking: the execution record and tracking header of each publish."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from celery import Celery, current_app
from celery.utils.log import get_logger

from . import signals
from .exceptions import TaskTrackerError
from .ids import new_execution_id
from .store.base import QUEUED, utcnow

if TYPE_CHECKING:
    from .extension import TaskTracker
    from .store.mongo import Document

__all__ = ["HEADER", "SendOutcome", "TaskKey", "on_before_task_publish", "register_send"]

logger = get_logger(__name__)

#: Message header that carries the tracking fields.
HEADER = "tasktracker"
#: Version of the tracking header layout.
HEADER_VERSION = 1

#: Attempts to insert after releasing a stale record before giving up.
_INSERT_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class TaskKey:
    """A taskId with the rendered parts it was built from."""

    task_id: str
    #: Parts of a key built from named arguments or a key function; empty for
    #: a key built from the digest of all arguments.
    parts: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SendOutcome:
    """Result of ``register_send``: the new execution, the active one, or both."""

    document: Document | None
    existing: Document | None

    @property
    def is_duplicate(self) -> bool:
        """True when the send must not be published."""
        return self.document is None

    @property
    def would_deduplicate(self) -> bool:
        """True when observe mode published a send that enforce mode would reject."""
        return self.document is not None and self.existing is not None

    @property
    def header(self) -> dict[str, Any]:
        """The tracking header for the message of the new execution."""
        assert self.document is not None
        return {
            "v": HEADER_VERSION,
            "taskId": self.document["taskId"],
            "executionId": self.document["executionId"],
            "attempt": self.document["attempt"],
        }


def build_document(
    *,
    key: TaskKey,
    task_name: str,
    celery_task_id: str,
    queue: str | None,
    attempt: int,
    now: dt.datetime,
    dedup_window: float,
    not_before: dt.datetime | None = None,
    holds_key: bool = True,
    status: str = QUEUED,
    extra: Mapping[str, Any] | None = None,
) -> Document:
    """Return a new execution record.

    *holds_key* is False for executions that must not take part in
    deduplication: group and chord members, and forced sends.
    """
    start = max(now, not_before) if not_before else now
    document: Document = {
        "taskId": key.task_id,
        "executionId": new_execution_id(),
        "celeryTaskId": celery_task_id,
        "taskName": task_name,
        "queue": queue,
        "attempt": attempt,
        "status": status,
        "active": holds_key,
        "createdAt": now,
        "updatedAt": now,
        "dedupExpiresAt": start + dt.timedelta(seconds=dedup_window),
        "redelivered": False,
    }
    if key.parts:
        document["keyParts"] = list(key.parts)
    if not_before and not_before > now:
        document["notBefore"] = not_before
    if extra:
        document.update(extra)
    return document


def register_send(
    tracker: TaskTracker,
    document: Document,
    *,
    observe: bool = False,
    preempt_since: dt.datetime | None = None,
) -> SendOutcome:
    """Insert *document* unless another execution of its taskId is active.

    The insert is the dedup check: the unique partial index on active records
    rejects a second active execution of the same taskId atomically. A record
    that no longer blocks (queued past its dedup window, or processing with a
    lapsed lease) is superseded and the insert tried again.

    With *observe*, a duplicate is counted as ``wouldDeduplicateSends`` on the
    active execution, and *document* is inserted anyway without the dedup
    key. The outcome then has both a document and the existing execution.

    *preempt_since* is set for a retry, which must never be deduplicated. A
    queued execution created at or after that time took the key in the gap
    between the failed attempt's release and this insert. It is superseded,
    so its message is skipped at claim, and the retry takes the key.

    Raises:
        TaskTrackerError: when the key changed hands on every attempt.
    """
    store = tracker.store
    task_id = document["taskId"]
    counter = "wouldDeduplicateSends" if observe else "deduplicatedSends"
    for _ in range(_INSERT_ATTEMPTS):
        if store.insert(document):
            return SendOutcome(document=document, existing=None)

        now = utcnow()
        if preempt_since is not None and _preempt(store, task_id, preempt_since, now):
            continue
        existing = store.note_deduplicated(task_id, now, counter=counter)
        if existing is not None:
            if not observe:
                return SendOutcome(document=None, existing=existing)
            document.update(active=False, wouldDeduplicate=True,
                            observedDuplicateOf=existing.get("executionId"))
            store.insert(document)
            return SendOutcome(document=document, existing=existing)

        # The holder is stale or finished after the insert: release a stale
        # one and try again.
        holder = store.find_active(task_id)
        if holder is not None and store.supersede_if_stale(holder, now):
            logger.info(
                "tasktracker: superseded stale %s execution of taskId=%s executionId=%s",
                holder.get("status"), task_id, holder.get("executionId"),
            )
    holder = store.find_active(task_id)
    if holder is None:
        raise TaskTrackerError(
            f"could not record a send of taskId {task_id!r}: its active execution "
            f"changed on each of {_INSERT_ATTEMPTS} attempts; send it again"
        )
    return SendOutcome(document=None, existing=holder)


def _preempt(store: Any, task_id: str, since: dt.datetime, now: dt.datetime) -> bool:
    holder = store.find_active(task_id)
    if (holder is None or holder.get("status") != QUEUED
            or holder.get("createdAt", since) < since):
        return False
    if not store.supersede_queued(holder["executionId"], now):
        return False
    logger.info(
        "tasktracker: a retry of taskId=%s superseded executionId=%s (celery task id %s), "
        "which was sent while the failed attempt handed over its key",
        task_id, holder.get("executionId"), holder.get("celeryTaskId"),
    )
    return True


def announce_duplicate(
    sender: Any, task_id: str, existing: Document | None, *, observed: bool = False,
) -> None:
    """Log a rejected send and send the ``task_deduplicated`` signal.

    *observed* marks a send that observe mode published although enforce
    mode would have rejected it; it is logged but sends no signal.
    """
    existing = existing or {}
    logger.info(
        "tasktracker: %s send of taskId=%s: executionId=%s is %s (celery task id %s)",
        "observe mode would deduplicate" if observed else "deduplicated",
        task_id, existing.get("executionId"), existing.get("status"),
        existing.get("celeryTaskId"),
    )
    if observed:
        return
    signals.send_safely(
        signals.task_deduplicated, sender,
        task_id=task_id, execution_id=existing.get("executionId"),
        celery_task_id=existing.get("celeryTaskId"), status=existing.get("status"),
    )


def on_before_task_publish(
    app: Celery,
    sender: str | None = None,
    body: Any = None,
    headers: dict[str, Any] | None = None,
    routing_key: str | None = None,
    **kwargs: Any,
) -> None:
    """Track messages of tracked tasks published without a tracking header.

    This covers ``app.send_task``, beat and any path that does not go
    through the tracked base class's ``apply_async`` of *app*. A Celery signal cannot
    stop a publish, so a duplicate is marked in its header and the worker
    skips it at claim time.
    """
    if not headers or HEADER in headers:
        return
    # NOTE: the signal does not say which app publishes, so with several
    # apps in one process only the current app's sends are tracked here.
    if current_app._get_current_object() is not app:
        return
    from .extension import get_tracker
    from .task import TrackedTask

    task = app.tasks.get(headers.get("task") or sender or "")
    if not isinstance(task, TrackedTask) or not task.is_tracking_enabled(routing_key):
        return
    args, call_kwargs = _body_arguments(body)
    try:
        tracker = get_tracker(app)
        observe = task.tracking_mode_in_effect() == "observe"
        key = task.build_task_key(args, call_kwargs)
        document = build_document(
            key=key, task_name=task.name, celery_task_id=headers["id"],
            queue=routing_key, attempt=int(headers.get("retries") or 0), now=utcnow(),
            dedup_window=tracker.config.dedup_window, not_before=_header_eta(headers),
            holds_key=not headers.get("group"),
            extra={"sentBy": "publish_hook", **task.stored_arguments(args, call_kwargs)},
        )
        outcome = register_send(tracker, document, observe=observe)
    except TaskTrackerError as exc:
        logger.warning(
            "tasktracker: could not track the publish of %s (celery task id %s); the "
            "worker will adopt it: %s", task.name, headers.get("id"), exc,
        )
        return

    if outcome.is_duplicate:
        existing = outcome.existing or {}
        headers[HEADER] = {
            "v": HEADER_VERSION, "taskId": key.task_id,
            "duplicateOf": existing.get("executionId"),
        }
        announce_duplicate(task, key.task_id, existing)
        return
    if outcome.would_deduplicate:
        announce_duplicate(task, key.task_id, outcome.existing, observed=True)
    headers[HEADER] = outcome.header


def _header_eta(headers: Mapping[str, Any]) -> dt.datetime | None:
    # Protocol 2 carries the ETA (countdown included) as an ISO 8601 string.
    eta = headers.get("eta")
    if not isinstance(eta, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(eta)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _body_arguments(body: Any) -> tuple[Sequence[Any], Mapping[str, Any]]:
    # Task message protocol 2 bodies are (args, kwargs, embed).
    if isinstance(body, list | tuple) and len(body) >= 2:
        return tuple(body[0] or ()), dict(body[1] or {})
    return (), {}
