"""The tracked Task base class: dedup at send, claim before run, outcome records."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

from celery import Task
from celery.exceptions import Ignore, ImproperlyConfigured, Reject, Retry
from celery.result import AsyncResult
from celery.utils import uuid
from celery.utils.log import get_logger
from celery.utils.time import get_exponential_backoff_interval

from . import monitoring, signals
from .batch import take_prepared_header
from .categories import categorize
from .config import MODES
from .dlq import dead_letter
from .exceptions import DuplicateTaskError, StoreUnavailableError, TaskIdError
from .extension import TaskTracker, get_tracker
from .ids import bind_arguments, canonical_digest, join_task_id, render_part
from .publish import (
    HEADER,
    TaskKey,
    announce_duplicate,
    build_document,
    register_send,
)
from .store.base import COMPLETED, FAILED, PROCESSING, QUEUED, utcnow

__all__ = ["ExecutionContext", "TrackedTask"]

logger = get_logger(__name__)

#: Request attribute that contains the running execution's context.
_CONTEXT_ATTRIBUTE = "tasktracker_execution"

#: Times an outcome write is tried before the error is logged and dropped;
#: with the growing pause between tries this spans about 30 seconds.
_OUTCOME_WRITE_ATTEMPTS = 8

#: Placeholder stored for a redacted argument value.
REDACTED = "[redacted]"

#: Seconds before a message whose claim found the store unreachable is tried again.
STORE_RETRY_DELAY = 5.0


class _ObservedBlock(Exception):
    """Observe mode reached a point where enforce mode would skip or defer."""

    def __init__(self, task_id: str | None, execution_id: str | None, reason: str,
                 *, untracked: bool = False) -> None:
        super().__init__(reason)
        self.task_id = task_id
        self.execution_id = execution_id
        self.untracked = untracked


@dataclasses.dataclass
class ExecutionContext:
    """State of the execution whose body is running in this worker process."""

    task_id: str
    execution_id: str
    celery_task_id: str
    attempt: int
    queue: str | None
    started: float = dataclasses.field(default_factory=time.monotonic)
    #: Set when the body called ``retry()``; an exception that still escapes
    #: the body then means the retries are exhausted.
    retry_requested: bool = False
    retry_exc: BaseException | None = None

    def runtime_ms(self) -> float:
        """Milliseconds since the body started."""
        return round((time.monotonic() - self.started) * 1000, 3)


class TrackedTask(Task):  # type: ignore[misc]
    """Celery task base class that tracks every execution in MongoDB.

    Use it per task (``@app.task(base=TrackedTask)``) or for the whole app
    (``Celery(task_cls=TrackedTask)``) after ``celery_tasktracker.install(app)``.
    Task code does not change: the class hooks ``apply_async``, ``retry`` and
    ``__call__``.
    """

    #: Namespace of the taskId; ``None`` uses the task name.
    tracking_namespace: ClassVar[str | None] = None

    #: Names of the arguments that identify the work, in key order. ``None``
    #: keys on a digest of all arguments.
    tracking_key_args: ClassVar[Sequence[str] | None] = None

    #: Callable receiving the task's arguments and returning the key parts (an
    #: iterable of values, or one string). Takes precedence over
    #: ``tracking_key_args``.
    tracking_key_func: ClassVar[Callable[..., Any] | None] = None

    #: Exception class paths mapped to error categories for this task,
    #: checked before ``tasktracker_error_categories``.
    tracking_error_categories: ClassVar[Mapping[str, str] | None] = None

    #: Categories this task retries automatically; ``None`` uses
    #: ``tasktracker_retry_categories``.
    tracking_retry_categories: ClassVar[Sequence[str] | None] = None

    #: ``"return_existing"`` or ``"raise"``; ``None`` uses
    #: ``tasktracker_duplicate_policy``.
    tracking_duplicate_policy: ClassVar[str | None] = None

    #: False turns tracking off for this task: it behaves as a plain task.
    tracking_enabled: ClassVar[bool] = True

    #: ``"enforce"`` or ``"observe"``; ``None`` uses ``tasktracker_mode``.
    tracking_mode: ClassVar[str | None] = None

    #: Store the call's arguments on each record (``args`` and ``kwargs``),
    #: which lets ``celery tasktracker stuck --requeue`` send the task again.
    #: Off by default because arguments may hold personal data.
    tracking_store_args: ClassVar[bool] = False

    #: Argument names whose values are stored as ``"[redacted]"`` when
    #: ``tracking_store_args`` is on; such a record cannot be requeued.
    tracking_redact_args: ClassVar[Sequence[str]] = ()

    #: The worker's request class: it expires the lease of an execution
    #: whose pool process died and records hard time limits.
    Request = "celery_tasktracker.worker:TrackedRequest"

    # -- identity ---------------------------------------------------------

    def is_tracking_enabled(self, queue: str | None = None) -> bool:
        """Return whether sends and executions of this task on *queue* are tracked.

        Reads only the task attribute and the cached settings, so an untracked
        task costs no store round trip.
        """
        if not self.tracking_enabled:
            return False
        return self.tracker.config.tracks(self.name, queue)

    def tracking_mode_in_effect(self) -> str:
        """Return ``"enforce"`` or ``"observe"`` for this task."""
        mode = self.tracking_mode or self.tracker.config.mode
        if mode not in MODES:
            raise ImproperlyConfigured(
                f"invalid tracking_mode {mode!r} on task {self.name!r}: expected one of "
                + ", ".join(repr(m) for m in MODES)
            )
        return mode

    @property
    def current_execution(self) -> ExecutionContext | None:
        """The tracked execution whose body is running in this process, or None.

        Inside a task body, ``self.current_execution.execution_id`` is the
        executionId to log or to pass on as an idempotency key.
        """
        return getattr(self.request, _CONTEXT_ATTRIBUTE, None)

    def stored_arguments(
        self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """Return the ``args`` and ``kwargs`` fields to store, or ``{}`` when not opted in."""
        if not self.tracking_store_args:
            return {}
        redact = set(self.tracking_redact_args)
        stored_args = list(args or ())
        stored_kwargs = dict(kwargs or {})
        if redact:
            names = list(bind_arguments(self.run, args, kwargs))
            for index in range(len(stored_args)):
                if index < len(names) and names[index] in redact:
                    stored_args[index] = REDACTED
            for name in redact & set(stored_kwargs):
                stored_kwargs[name] = REDACTED
        fields: dict[str, Any] = {"args": stored_args, "kwargs": stored_kwargs}
        if redact:
            fields["redactedArgs"] = sorted(redact)
        return fields

    @property
    def tracker(self) -> TaskTracker:
        """The tracker installed on this task's app."""
        return get_tracker(self.app)

    def build_task_key(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
    ) -> TaskKey:
        """Return the taskId of a call with *args* and *kwargs*.

        Arguments are bound to the task's signature with defaults filled in,
        so equivalent calls give one taskId.

        Raises:
            TaskIdError: if the arguments do not fit the signature, a named key
                argument does not exist, or a value has no canonical form.
        """
        namespace = self.tracking_namespace or self.name
        bound = bind_arguments(self.run, args, kwargs)

        # Read from the class: a function stored as a class attribute would
        # otherwise be bound to the task like a method.
        key_func = type(self).tracking_key_func
        if key_func is not None:
            parts = key_func(*(args or ()), **(kwargs or {}))
            if isinstance(parts, str | bytes) or not isinstance(parts, Iterable):
                parts = (parts,)
            rendered = tuple(render_part(part) for part in parts)
            return TaskKey(join_task_id(namespace, rendered), rendered)

        if isinstance(self.tracking_key_args, str):
            raise TaskIdError(
                f"tracking_key_args of task {self.name!r} is the string "
                f"{self.tracking_key_args!r}; give a sequence of names such as "
                f"({self.tracking_key_args!r},)"
            )
        if self.tracking_key_args is not None:
            missing = [name for name in self.tracking_key_args if name not in bound]
            if missing:
                raise TaskIdError(
                    f"tracking_key_args of task {self.name!r} names {missing!r}, which "
                    f"the signature does not have; its parameters are {list(bound)!r}"
                )
            rendered = tuple(render_part(bound[name]) for name in self.tracking_key_args)
            return TaskKey(join_task_id(namespace, rendered), rendered)

        return TaskKey(join_task_id(namespace, [canonical_digest(bound)[:32]]))

    # -- send -------------------------------------------------------------

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Send the task unless an equal one is active; see :class:`celery.Task`.

        Extra options:
            tasktracker_force (bool): send a new execution even when an equal
                one is active. It does not take part in deduplication.
        """
        force = bool(options.pop("tasktracker_force", False))
        headers = dict(options.get("headers") or {})
        celery_task_id = task_id or uuid()
        prepared = take_prepared_header(celery_task_id, args, kwargs)
        if prepared is not None:
            # A member of send_group(), whose record is already inserted.
            return self._publish_tracked(prepared, headers, args, kwargs, {
                **options, "task_id": celery_task_id, "producer": producer, "link": link,
                "link_error": link_error, "shadow": shadow,
            })
        attempt = int(options.get("retries") or 0)
        retrying = self._current_context_for_retry(celery_task_id, attempt)

        # A message that already carries a tracking header (a DLQ replay
        # prepared by the caller) is published as it is, but a retry copies
        # the running request's header and must get a new one.
        passthrough = HEADER in headers and retrying is None
        queue = None
        if not (passthrough or not self.tracking_enabled or self.app.conf.task_always_eager):
            queue = self._route_queue(options, args, kwargs)
        if queue is None or not self.is_tracking_enabled(queue):
            return super().apply_async(
                args, kwargs, task_id=celery_task_id, producer=producer, link=link,
                link_error=link_error, shadow=shadow, **options,
            )

        tracker = self.tracker
        observe = self.tracking_mode_in_effect() == "observe"
        try:
            key = self.build_task_key(args, kwargs)
            released_at = None
            if retrying is not None:
                released_at = utcnow()
                self._record_retried_attempt(tracker, retrying)
            document = build_document(
                key=key, task_name=self.name, celery_task_id=celery_task_id,
                queue=queue, attempt=attempt,
                now=utcnow(), dedup_window=tracker.config.dedup_window,
                not_before=_not_before(options),
                holds_key=not (force or options.get("group_id")),
                extra={**_send_extra(force, retrying), **self.stored_arguments(args, kwargs)},
            )
            outcome = register_send(tracker, document, observe=observe,
                                    preempt_since=released_at)
        except StoreUnavailableError as exc:
            if tracker.config.store_unavailable != "send_untracked" and not observe:
                raise
            logger.warning(
                "tasktracker: sending %s (celery task id %s) untracked because the "
                "store is unavailable: %s", self.name, celery_task_id, exc,
            )
            return super().apply_async(
                args, kwargs, task_id=celery_task_id, producer=producer, link=link,
                link_error=link_error, shadow=shadow, **options,
            )

        if outcome.is_duplicate:
            return self._duplicate_result(key.task_id, outcome.existing)
        if outcome.would_deduplicate:
            announce_duplicate(self, key.task_id, outcome.existing, observed=True)

        return self._publish_tracked(outcome.header, headers, args, kwargs, {
            **options, "task_id": celery_task_id, "producer": producer, "link": link,
            "link_error": link_error, "shadow": shadow,
        })

    def _publish_tracked(
        self,
        header: dict[str, Any],
        message_headers: dict[str, Any],
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: dict[str, Any],
    ) -> AsyncResult:
        """Publish with the tracking *header*; release the execution if that fails."""
        message_headers[HEADER] = header
        options["headers"] = message_headers
        try:
            return super().apply_async(args, kwargs, **options)
        except BaseException as exc:
            self._release_unsent(self.tracker, header["executionId"], exc)
            raise

    def _route_queue(
        self, options: Mapping[str, Any], args: Any, kwargs: Any,
    ) -> str:
        # Resolve the queue as send_task will: the caller's queue option, then
        # the task's own queue attribute, then task_routes, then the default.
        queue = options.get("queue")
        if queue is None:
            queue = self._get_exec_options().get("queue")
        if isinstance(queue, str):
            return queue
        if queue is not None:
            return str(queue.name)
        router = self.app.amqp.router
        if not router.routes:
            return str(self.app.conf.task_default_queue)
        try:
            routed = router.route(dict(options), self.name, args, kwargs)
        except Exception:
            return str(self.app.conf.task_default_queue)
        destination = routed.get("queue")
        return str(getattr(destination, "name", destination or self.app.conf.task_default_queue))

    def _duplicate_result(self, task_id: str, existing: Mapping[str, Any] | None) -> AsyncResult:
        existing = existing or {}
        announce_duplicate(self, task_id, dict(existing))
        policy = self.tracking_duplicate_policy or self.tracker.config.duplicate_policy
        if policy == "raise":
            raise DuplicateTaskError(
                task_id, existing.get("executionId"), existing.get("celeryTaskId"),
                existing.get("status"),
            )
        return self.AsyncResult(existing.get("celeryTaskId"))

    def _release_unsent(self, tracker: TaskTracker, execution_id: str, exc: BaseException) -> None:
        # The message never left: mark the record failed so it does not
        # block the next send, then let the caller see the publish error.
        try:
            tracker.store.fail(execution_id, now=utcnow(), error={
                **_error_fields(exc, "transient", tracker.config.traceback_max_length),
                "errorMessage": f"publish failed: {exc}",
            })
        except StoreUnavailableError:
            logger.exception(
                "tasktracker: could not release unsent executionId=%s", execution_id,
            )

    # -- retry ------------------------------------------------------------

    def retry(self, *args: Any, exc: BaseException | None = None, **kwargs: Any) -> Any:
        """Retry the task as a new execution of the same taskId; see :class:`celery.Task`."""
        context = getattr(self.request, _CONTEXT_ATTRIBUTE, None)
        if context is not None:
            context.retry_requested = True
            context.retry_exc = exc
        return super().retry(*args, exc=exc, **kwargs)

    def _current_context_for_retry(
        self, celery_task_id: str, attempt: int,
    ) -> ExecutionContext | None:
        # Task.retry() republishes with the running request's celery task id
        # and retries + 1; any other send is a new logical send.
        context = getattr(self.request, _CONTEXT_ATTRIBUTE, None)
        if context is None or attempt <= 0 or context.celery_task_id != celery_task_id:
            return None
        return context  # type: ignore[no-any-return]

    def _record_retried_attempt(self, tracker: TaskTracker, context: ExecutionContext) -> None:
        monitoring.count("failed")
        monitoring.count("retried")
        exc = context.retry_exc
        category = self._categorize(exc) if exc is not None else "unknown"
        error = (_error_fields(exc, category, tracker.config.traceback_max_length)
                 if exc is not None else {"errorCategory": category})
        tracker.store.fail(
            context.execution_id, now=utcnow(), error=error,
            runtime_ms=context.runtime_ms(), extra={"willRetry": True},
        )
        logger.info(
            "tasktracker: attempt %d of taskId=%s executionId=%s failed (%s); retrying",
            context.attempt, context.task_id, context.execution_id, category,
        )
        signals.send_safely(
            signals.execution_failed, self, task_id=context.task_id,
            execution_id=context.execution_id, celery_task_id=context.celery_task_id,
            category=category, exception=exc, will_retry=True,
        )

    # -- execution --------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if (request.called_directly or request.is_eager or not self.tracking_enabled
                or not self.is_tracking_enabled(
                    (request.delivery_info or {}).get("routing_key"))):
            return super().__call__(*args, **kwargs)

        try:
            context = self._claim(request, args, kwargs)
        except _ObservedBlock as blocked:
            if blocked.untracked:
                return super().__call__(*args, **kwargs)
            context = self._observe_blocked(request, args, kwargs, blocked)
        setattr(request, _CONTEXT_ATTRIBUTE, context)
        try:
            result = super().__call__(*args, **kwargs)
        except Retry:
            raise
        except Ignore:
            self._record_success(context, None, ignored=True)
            raise
        except Reject as exc:
            self._record_rejected(context, exc)
            raise
        except Exception as exc:
            self._handle_failure(context, exc)
            raise
        self._record_success(context, result)
        return result

    def _claim(
        self, request: Any, args: Sequence[Any], kwargs: Mapping[str, Any],
    ) -> ExecutionContext:
        """Claim the execution of this delivery, or raise ``Ignore`` to skip it."""
        tracker = self.tracker
        headers = getattr(request, "headers", None) or {}
        header = headers.get(HEADER) or getattr(request, HEADER, None) or {}
        if header.get("duplicateOf") is not None:
            self._skip_delivery(str(header.get("taskId")), header["duplicateOf"], request.id,
                                "deduplicated at publish", record=False)

        now = utcnow()
        lease_until = now + dt.timedelta(seconds=tracker.config.lease)
        worker = {"hostname": request.hostname, "pid": os.getpid()}
        execution_id = header.get("executionId")
        try:
            if execution_id is None:
                return self._adopt(request, args, kwargs, worker, now, lease_until)
            claim = tracker.store.claim(
                execution_id, worker=worker, now=now, lease_expires_at=lease_until,
            )
            if claim.record == {}:
                # The record is gone (purged or expired): adopt the message
                # under the executionId it carries.
                return self._adopt(request, args, kwargs, worker, now, lease_until,
                                   execution_id=execution_id)
        except StoreUnavailableError as exc:
            # Nothing ran yet, so publish the message again for later.
            self._defer(request, STORE_RETRY_DELAY, f"tracking store unavailable: {exc}",
                        store_unavailable=True)

        if not claim.claimed:
            self._skip_or_defer(request, str(header.get("taskId")), str(execution_id),
                                claim.record or {})
        context = ExecutionContext(
            task_id=header["taskId"], execution_id=str(claim.execution_id),
            celery_task_id=request.id, attempt=int(header.get("attempt", request.retries)),
            queue=(request.delivery_info or {}).get("routing_key"),
        )
        self._announce_claim(context, redelivered=claim.redelivered)
        return context

    def _skip_or_defer(
        self, request: Any, task_id: str, execution_id: str, record: Mapping[str, Any],
    ) -> None:
        # A broker redelivery whose execution still holds a live lease may
        # come from a worker that just died: try again once the lease could
        # have lapsed. So does a copy deferred before, because it may be the
        # last copy of the message: the deferring delivery was acknowledged,
        # and on Redis that also acknowledges the copy still running. Any
        # other blocked delivery is a duplicate.
        header = ((getattr(request, "headers", None) or {}).get(HEADER)
                  or getattr(request, HEADER, None) or {})
        redelivered = (bool((request.delivery_info or {}).get("redelivered"))
                       or bool(header.get("deferred")))
        lease = record.get("leaseExpiresAt")
        if redelivered and record.get("status") == PROCESSING and lease is not None:
            wait = max(1.0, (lease - utcnow()).total_seconds() + 1.0)
            self._defer(request, wait, "redelivered while its execution holds a live lease")
        if record.get("dlqPending"):
            self._retry_dead_letter(request, record)
        self._skip_delivery(task_id or str(record.get("taskId")), execution_id, request.id,
                            _skip_reason(record), record=True)

    def _defer(
        self, request: Any, countdown: float, reason: str, *, store_unavailable: bool = False,
    ) -> None:
        """Publish this message again after *countdown* seconds, then raise ``Ignore``.

        Observe mode never delays a message: it runs the body now, tracked as
        a would-be skip, or untracked when the store is unreachable.
        """
        if self.tracking_mode_in_effect() == "observe":
            header = (getattr(request, "headers", None) or {}).get(HEADER) or {}
            logger.info("tasktracker: observe mode runs %s (celery task id %s) that enforce "
                        "mode would defer: %s", self.name, request.id, reason)
            raise _ObservedBlock(header.get("taskId"), header.get("executionId"), reason,
                                 untracked=store_unavailable)
        headers = dict(getattr(request, "headers", None) or {})
        headers[HEADER] = {**(headers.get(HEADER) or {"v": 1, "adopt": True}),
                           "deferred": True}
        signature = self.signature_from_request(request, request.args, request.kwargs)
        try:
            signature.apply_async(countdown=countdown, headers=headers)
        except Exception as exc:
            # With late acks the broker still has this delivery unacknowledged,
            # so reject it back to the queue instead of losing it.
            logger.error(
                "tasktracker: could not defer %s (celery task id %s): %s",
                self.name, request.id, exc,
            )
            raise Reject(f"tasktracker: could not defer: {exc}", requeue=True) from exc
        tracking = headers.get(HEADER) or {}
        logger.warning(
            "tasktracker: deferred %s taskId=%s executionId=%s (celery task id %s) by "
            "%.1f s: %s", self.name, tracking.get("taskId"), tracking.get("executionId"),
            request.id, countdown, reason,
        )
        raise Ignore(f"tasktracker: deferred: {reason}")

    def _retry_dead_letter(self, request: Any, record: Mapping[str, Any]) -> None:
        # The body already ran and failed, but its DLQ publish failed: publish
        # again without running the body.
        context = ExecutionContext(
            task_id=record["taskId"], execution_id=record["executionId"],
            celery_task_id=request.id, attempt=int(record.get("attempt", 0)),
            queue=record.get("queue"),
        )
        error = {key: record.get(key) for key in
                 ("errorCategory", "errorType", "errorMessage", "traceback")}
        dead_letter(self, context, error=error, reason=str(record.get("failureReason")))
        raise Ignore("tasktracker: dead-lettered a task whose DLQ publish had failed")

    def _adopt(
        self,
        request: Any,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        worker: Mapping[str, Any],
        now: dt.datetime,
        lease_until: dt.datetime,
        execution_id: str | None = None,
    ) -> ExecutionContext:
        # A message from a producer without the extension: derive the taskId
        # here and create the record already claimed.
        tracker = self.tracker
        store = tracker.store
        existing = store.find_by_celery_id(request.id, attempt=request.retries)
        if existing is not None and execution_id is None:
            # A redelivery of a message adopted before.
            claim = store.claim(existing["executionId"], worker=worker, now=now,
                                lease_expires_at=lease_until)
            if not claim.claimed:
                self._skip_or_defer(request, existing["taskId"], existing["executionId"],
                                    claim.record or existing)
            context = ExecutionContext(
                task_id=existing["taskId"], execution_id=str(claim.execution_id),
                celery_task_id=request.id, attempt=request.retries,
                queue=existing.get("queue"),
            )
            self._announce_claim(context, redelivered=True)
            return context

        key = self.build_task_key(args, kwargs)
        queue = (request.delivery_info or {}).get("routing_key")
        document = build_document(
            key=key, task_name=self.name, celery_task_id=request.id, queue=queue,
            attempt=request.retries, now=now, dedup_window=tracker.config.dedup_window,
            holds_key=not request.group, status=PROCESSING,
            extra={"adopted": True, "worker": dict(worker), "startedAt": now,
                   "leaseExpiresAt": lease_until, **self.stored_arguments(args, kwargs)},
        )
        if execution_id is not None:
            document["executionId"] = execution_id
        outcome = register_send(tracker, document,
                                observe=self.tracking_mode_in_effect() == "observe")
        if outcome.is_duplicate:
            existing = outcome.existing or {}
            self._skip_delivery(key.task_id, existing.get("executionId"), request.id,
                                f"taskId is {existing.get('status', 'active')}", record=False)
        context = ExecutionContext(
            task_id=key.task_id, execution_id=document["executionId"],
            celery_task_id=request.id, attempt=request.retries, queue=queue,
        )
        self._announce_claim(context, redelivered=False)
        return context

    def _observe_blocked(
        self, request: Any, args: Sequence[Any], kwargs: Mapping[str, Any],
        blocked: _ObservedBlock,
    ) -> ExecutionContext:
        # Observe mode: run the delivery enforce mode would skip, as its own
        # execution that does not take the dedup key.
        tracker = self.tracker
        now = utcnow()
        key = (TaskKey(blocked.task_id) if blocked.task_id and blocked.task_id != "None"
               else self.build_task_key(args, kwargs))
        document = build_document(
            key=key, task_name=self.name, celery_task_id=request.id,
            queue=(request.delivery_info or {}).get("routing_key"), attempt=request.retries,
            now=now, dedup_window=tracker.config.dedup_window, holds_key=False,
            status=PROCESSING,
            extra={"wouldSkip": True, "observedSkipOf": blocked.execution_id,
                   "worker": {"hostname": request.hostname, "pid": os.getpid()},
                   "startedAt": now,
                   "leaseExpiresAt": now + dt.timedelta(seconds=tracker.config.lease)},
        )
        try:
            tracker.store.insert(document)
        except StoreUnavailableError as exc:
            # Observe mode must not change what runs: run it without a record.
            logger.warning(
                "tasktracker: could not record the observed execution of taskId=%s "
                "(celery task id %s): %s", key.task_id, request.id, exc,
            )
        context = ExecutionContext(
            task_id=key.task_id, execution_id=document["executionId"],
            celery_task_id=request.id, attempt=request.retries, queue=document["queue"],
        )
        self._announce_claim(context, redelivered=False)
        return context

    def _announce_claim(self, context: ExecutionContext, *, redelivered: bool) -> None:
        monitoring.count("claimed")
        logger.debug(
            "tasktracker: claimed taskId=%s executionId=%s attempt=%d",
            context.task_id, context.execution_id, context.attempt,
        )
        signals.send_safely(
            signals.execution_claimed, self, task_id=context.task_id,
            execution_id=context.execution_id, celery_task_id=context.celery_task_id,
            attempt=context.attempt, redelivered=redelivered,
        )

    def _skip_delivery(
        self, task_id: str, execution_id: str | None, celery_task_id: str, reason: str,
        *, record: bool,
    ) -> None:
        """Record and announce a delivery that must not run, then raise ``Ignore``.

        Observe mode counts it as a would-be skip and raises ``_ObservedBlock``
        so the body runs anyway.
        """
        observe = self.tracking_mode_in_effect() == "observe"
        if not observe:
            monitoring.count("skipped_duplicates")
        if (record or observe) and execution_id is not None:
            counter = "wouldSkipDeliveries" if observe else "duplicateDeliveries"
            try:
                self.tracker.store.note_duplicate_delivery(execution_id, utcnow(),
                                                           counter=counter)
            except StoreUnavailableError:
                logger.exception(
                    "tasktracker: could not record duplicate delivery of executionId=%s",
                    execution_id,
                )
        if observe:
            logger.info(
                "tasktracker: observe mode would skip delivery of taskId=%s executionId=%s "
                "(celery task id %s): %s", task_id, execution_id, celery_task_id, reason,
            )
            raise _ObservedBlock(task_id, execution_id, reason)
        logger.info(
            "tasktracker: skipped delivery of taskId=%s executionId=%s (celery task id %s): "
            "%s", task_id, execution_id, celery_task_id, reason,
        )
        signals.send_safely(
            signals.duplicate_delivery_skipped, self, task_id=task_id,
            execution_id=execution_id, celery_task_id=celery_task_id, reason=reason,
        )
        raise Ignore(f"tasktracker: duplicate delivery of {task_id}: {reason}")

    def _record_success(
        self, context: ExecutionContext, result: Any, *, ignored: bool = False,
    ) -> None:
        config = self.tracker.config
        runtime_ms = context.runtime_ms()
        summary = None if ignored else _summarize(result, config.result_max_length)
        monitoring.count("completed")
        _write_outcome(
            lambda: self.tracker.store.complete(
                context.execution_id, now=utcnow(), runtime_ms=runtime_ms, result=summary,
            ),
            context, COMPLETED,
        )
        signals.send_safely(
            signals.execution_completed, self, task_id=context.task_id,
            execution_id=context.execution_id, celery_task_id=context.celery_task_id,
            runtime_ms=runtime_ms, result=summary,
        )

    def _record_rejected(self, context: ExecutionContext, exc: Reject) -> None:
        # A requeued message runs again as the same execution, so it goes back
        # to queued; a rejected one is finished.
        config = self.tracker.config
        store = self.tracker.store
        if exc.requeue:
            _write_outcome(lambda: store.requeue(context.execution_id, now=utcnow()),
                           context, QUEUED)
            return
        _write_outcome(
            lambda: store.fail(
                context.execution_id, now=utcnow(), runtime_ms=context.runtime_ms(),
                error=_error_fields(exc, "permanent", config.traceback_max_length),
            ),
            context, FAILED,
        )

    def _categorize(self, exc: BaseException) -> str:
        return categorize(
            exc, task_categories=self.tracking_error_categories,
            app_categories=self.tracker.config.error_categories,
        )

    def _handle_failure(self, context: ExecutionContext, exc: Exception) -> None:
        """Retry *exc* if its category allows it, else dead-letter the task.

        Returns only when the failure is final; the caller re-raises *exc*.
        """
        category = self._categorize(exc)
        config = self.tracker.config
        if context.retry_requested:
            # retry() was called and still an exception escaped: Celery
            # re-raises the original error once max_retries is reached.
            reason = "retries_exhausted"
        else:
            retry_categories = config.retry_categories
            if self.tracking_retry_categories is not None:
                retry_categories = tuple(self.tracking_retry_categories)
            if category not in retry_categories:
                reason = "not_retryable"
            elif self.max_retries is not None and self.request.retries >= self.max_retries:
                reason = "retries_exhausted"
            else:
                self._retry_by_category(context, exc)
                reason = "retry_publish_failed"

        monitoring.count("failed")
        signals.send_safely(
            signals.execution_failed, self, task_id=context.task_id,
            execution_id=context.execution_id, celery_task_id=context.celery_task_id,
            category=category, exception=exc, will_retry=False,
        )
        error = _error_fields(exc, category, config.traceback_max_length)
        if not config.dlq_enabled:
            _write_outcome(
                lambda: self.tracker.store.fail(
                    context.execution_id, now=utcnow(), error=error,
                    runtime_ms=context.runtime_ms(), extra={"failureReason": reason},
                ),
                context, FAILED,
            )
            return
        dead_letter(self, context, error=error, reason=reason)

    def _retry_by_category(self, context: ExecutionContext, exc: Exception) -> None:
        """Raise ``Retry``; return only when publishing the retry failed."""
        try:
            raise self.retry(exc=exc, countdown=self._retry_countdown())
        except Retry:
            raise
        except Exception as publish_error:
            if publish_error is exc:
                raise
            logger.error(
                "tasktracker: could not publish the retry of taskId=%s executionId=%s: %s",
                context.task_id, context.execution_id, publish_error,
            )

    def _retry_countdown(self) -> float:
        # The same attributes that Celery's autoretry_for reads.
        backoff = getattr(self, "retry_backoff", False)
        if backoff:
            return float(get_exponential_backoff_interval(
                factor=int(backoff), retries=self.request.retries,
                maximum=getattr(self, "retry_backoff_max", 600),
                full_jitter=getattr(self, "retry_jitter", True),
            ))
        return float(self.default_retry_delay)


def _send_extra(force: bool, retrying: ExecutionContext | None) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if force:
        extra["forced"] = True
    if retrying is not None:
        extra["retryOf"] = retrying.execution_id
    return extra


def _not_before(options: Mapping[str, Any]) -> dt.datetime | None:
    eta = options.get("eta")
    if isinstance(eta, dt.datetime):
        return eta if eta.tzinfo else eta.replace(tzinfo=dt.timezone.utc)
    countdown = options.get("countdown")
    if isinstance(countdown, int | float) and countdown > 0:
        return utcnow() + dt.timedelta(seconds=countdown)
    return None


def _skip_reason(record: Mapping[str, Any]) -> str:
    if record.get("superseded"):
        return "superseded by a newer execution"
    status = record.get("status")
    if status == PROCESSING:
        return "already running with a live lease"
    if status == COMPLETED:
        return "already completed"
    return f"execution is {status or 'unknown'}"


def _summarize(result: Any, max_length: int) -> str | None:
    if result is None:
        return None
    text = repr(result)
    if len(text) > max_length:
        return text[: max_length - 3] + "..."
    return text


def _error_fields(exc: BaseException, category: str, max_traceback: int) -> dict[str, Any]:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if len(text) > max_traceback:
        text = "..." + text[-(max_traceback - 3):]
    cls = type(exc)
    return {
        "errorCategory": category,
        "errorType": f"{cls.__module__}.{cls.__qualname__}",
        "errorMessage": str(exc)[:1000],
        "traceback": text,
    }


def _write_outcome(write: Callable[[], bool], context: ExecutionContext, status: str) -> None:
    # The body already ran, so a lost outcome write must not make it run
    # again: retry the write a few times, then log and carry on.
    for attempt in range(1, _OUTCOME_WRITE_ATTEMPTS + 1):
        try:
            if not write():
                logger.warning(
                    "tasktracker: executionId=%s of taskId=%s was no longer processing "
                    "when recording %s", context.execution_id, context.task_id, status,
                )
            return
        except StoreUnavailableError as exc:
            if attempt == _OUTCOME_WRITE_ATTEMPTS:
                logger.error(
                    "tasktracker: could not record %s for taskId=%s executionId=%s: %s",
                    status, context.task_id, context.execution_id, exc,
                )
                return
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
