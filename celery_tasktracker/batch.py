"""Group sends whose tracked members are recorded in one store write."""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from celery.canvas import Signature, chord, group
from celery.utils.log import get_logger

from .exceptions import StoreUnavailableError
from .extension import get_tracker
from .publish import HEADER, SendOutcome, TaskKey, build_document
from .store.base import utcnow

if TYPE_CHECKING:
    from celery import Celery

    from .extension import TaskTracker
    from .store.mongo import Document

__all__ = ["send_group", "take_prepared_header"]

logger = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A member record inserted before its message is published."""

    header: dict[str, Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


#: Records inserted by the running send_group() call, by celery task id.
_prepared: contextvars.ContextVar[dict[str, _Prepared] | None] = contextvars.ContextVar(
    "tasktracker_prepared", default=None,
)


def take_prepared_header(
    celery_task_id: str, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """Return the tracking header that send_group() prepared for this message, or None.

    The header is used once. It is not used when Celery publishes the member
    with other arguments than the record was built from: the member is then
    tracked as a single send, and send_group() deletes the unused record.
    """
    prepared = _prepared.get()
    if not prepared:
        return None
    entry = prepared.get(celery_task_id)
    if entry is None or tuple(args or ()) != entry.args or dict(kwargs or {}) != entry.kwargs:
        return None
    del prepared[celery_task_id]
    return entry.header


def send_group(signature: group | chord, **options: Any) -> Any:
    """Apply a group or chord, inserting the records of its tracked members in one write.

    ``group(...).apply_async()`` makes one store round trip per tracked
    member; this makes one for all of them, then publishes the members as
    Celery does. Returns what ``signature.apply_async(**options)`` returns.
    Members are not deduplicated, against each other or against other
    sends, just as in a plain group. Members that are not plain task
    signatures (chains, nested chords) and the chord body are tracked when
    Celery sends them, one round trip each. Partial arguments belong in the
    member signatures: with ``args`` or ``kwargs`` given here the call is
    ``signature.apply_async(**options)`` and each member is tracked one by one.
    """
    app = signature.app
    if app.conf.task_always_eager or options.get("args") or options.get("kwargs"):
        return signature.apply_async(**options)

    # Freezing gives every member its celery task id before anything is
    # published; apply_async keeps the ids of a frozen signature.
    signature.freeze()
    defaults = {**signature.options, **options}
    prepared: dict[str, _Prepared] = {}
    documents: list[Document] = []
    for member in _members(signature):
        document = _member_document(app, member, defaults)
        if document is None:
            continue
        header = SendOutcome(document=document, existing=None).header
        prepared[document["celeryTaskId"]] = _Prepared(
            header, tuple(member.args or ()), dict(member.kwargs or {}),
        )
        documents.append(document)

    tracker = get_tracker(app)
    try:
        tracker.store.insert_many_unordered(documents)
    except StoreUnavailableError as exc:
        # Each member then applies tasktracker_store_unavailable on its own.
        logger.warning(
            "tasktracker: could not record the %d members of group %s in one write; "
            "sending them one by one: %s", len(documents), signature.id, exc,
        )
        return signature.apply_async(**options)

    token = _prepared.set(prepared)
    try:
        return signature.apply_async(**options)
    finally:
        _prepared.reset(token)
        if prepared:
            _delete_unused(tracker, signature, list(prepared.values()))


def _members(signature: group | chord) -> Iterator[Signature]:
    # After freeze() a group lists its members with nested groups flattened,
    # and a chord's header is a group.
    header = signature.tasks
    if isinstance(header, group):
        header = header.tasks
    for member in header:
        if isinstance(member, Signature) and member.subtask_type is None:
            yield member


def _member_document(
    app: Celery, member: Signature, defaults: Mapping[str, Any],
) -> Document | None:
    from .task import TrackedTask, _not_before

    task = app.tasks.get(member.task)
    if not isinstance(task, TrackedTask) or not task.tracking_enabled:
        return None
    # Options given to the group override the member's own, as in Celery.
    options = {**member.options, **defaults}
    if HEADER in (options.get("headers") or {}):
        return None
    queue = task._route_queue(options, member.args, member.kwargs)
    if not task.is_tracking_enabled(queue):
        return None
    key: TaskKey = task.build_task_key(member.args, member.kwargs)
    return build_document(
        key=key, task_name=task.name, celery_task_id=member.options["task_id"],
        queue=queue, attempt=0, now=utcnow(),
        dedup_window=task.tracker.config.dedup_window,
        not_before=_not_before(options), holds_key=False,
    )


def _delete_unused(
    tracker: TaskTracker, signature: Signature, unused: list[_Prepared],
) -> None:
    # Members whose prepared record was not used were tracked one by one, or
    # never published because the group send failed part way.
    execution_ids = [entry.header["executionId"] for entry in unused]
    try:
        tracker.store.delete_unsent(execution_ids)
    except StoreUnavailableError:
        logger.exception(
            "tasktracker: could not delete %d unused records of group %s",
            len(execution_ids), signature.id,
        )
