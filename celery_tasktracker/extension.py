"""Installing the extension on a Celery app: settings, store, signal handlers."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from celery.utils.log import get_logger

from .config import TrackerConfig
from .exceptions import TaskTrackerError
from .store import MongoStore

if TYPE_CHECKING:
    from pymongo.monitoring import _EventListener

    from .store.mongo import Document

__all__ = ["TaskTracker", "get_tracker", "install"]

logger = get_logger(__name__)

_ATTRIBUTE = "_tasktracker"


class TaskTracker:
    """The extension's state for one Celery app: validated settings and the store.

    Settings are read on first use, so ``install(app)`` may run before the
    app's configuration is loaded.
    """

    def __init__(
        self, app: Celery, *, event_listeners: Sequence[_EventListener] = (),
    ) -> None:
        self.app = app
        #: pymongo monitoring listeners attached to the store's client.
        self.event_listeners = list(event_listeners)
        self._lock = threading.Lock()
        self._config: TrackerConfig | None = None
        self._store: MongoStore | None = None

    @property
    def config(self) -> TrackerConfig:
        """The validated settings; raises ``ImproperlyConfigured`` when invalid."""
        if self._config is None:
            with self._lock:
                if self._config is None:
                    self._config = TrackerConfig.from_mapping(self.app.conf)
        return self._config

    @property
    def store(self) -> MongoStore:
        """The execution store of this app."""
        if self._store is None:
            config = self.config
            with self._lock:
                if self._store is None:
                    self._store = MongoStore(config, event_listeners=self.event_listeners)
        return self._store

    def add_event_listeners(self, listeners: Sequence[_EventListener]) -> None:
        """Attach pymongo monitoring *listeners* to the store's client.

        A client that already exists in this process is closed, so the next
        store operation reconnects with the listeners attached.
        """
        with self._lock:
            self.event_listeners.extend(listeners)
            store = self._store
        if store is not None:
            store.event_listeners = list(self.event_listeners)
            store.close()

    def history(self, task_id: str) -> list[Document]:
        """Return every execution of *task_id*, oldest first: its retry chain."""
        return self.store.history(task_id)

    def dlq_name(self, queue: str) -> str:
        """Return the dead-letter queue name for the source *queue*."""
        return f"{queue}{self.config.dlq_suffix}"

    def reset(self) -> None:
        """Forget the settings and close the store, e.g. after changing the config."""
        with self._lock:
            if self._store is not None:
                self._store.close()
            self._store = None
            self._config = None


def get_tracker(app: Celery) -> TaskTracker:
    """Return the tracker installed on *app*.

    Raises:
        TaskTrackerError: if ``install(app)`` was not called.
    """
    tracker = getattr(app, _ATTRIBUTE, None)
    if tracker is None:
        raise TaskTrackerError(
            f"celery_tasktracker is not installed on app {app.main!r}: call "
            "celery_tasktracker.install(app) where the app is created"
        )
    return tracker  # type: ignore[no-any-return]


def install(
    app: Celery, *, event_listeners: Sequence[_EventListener] = (),
) -> TaskTracker:
    """Install the extension on *app* and return its tracker.

    Connects the publish hook that tracks ``send_task`` and beat messages and
    the worker start-up hook that validates settings and creates indexes.
    Calling it again on the same app returns the same tracker.

    *event_listeners* are pymongo monitoring listeners, such as a
    ``pymongo.monitoring.CommandListener``. They are attached to the store's
    client in every process, and a second call adds its listeners.
    """
    existing = getattr(app, _ATTRIBUTE, None)
    if existing is not None:
        if event_listeners:
            existing.add_event_listeners(event_listeners)
        return existing  # type: ignore[no-any-return]

    tracker = TaskTracker(app, event_listeners=event_listeners)
    setattr(app, _ATTRIBUTE, tracker)

    # Imported here because both modules import this one.
    from .monitoring import install_worker_components
    from .publish import on_before_task_publish

    uid = f"celery_tasktracker:{id(app)}"
    def track_publish(sender: Any = None, **kwargs: Any) -> None:
        on_before_task_publish(app, sender, **kwargs)

    signals.before_task_publish.connect(
        track_publish, weak=False, dispatch_uid=f"{uid}:publish",
    )
    from .worker import on_task_revoked

    signals.task_revoked.connect(
        on_task_revoked, weak=False, dispatch_uid=f"{uid}:revoked",
    )
    signals.worker_init.connect(
        _on_worker_init, sender=None, weak=False, dispatch_uid=f"{uid}:worker_init",
    )
    install_worker_components(app)
    if app.finalized:
        _add_dlq_queues(app)
    else:
        app.on_after_finalize.connect(_add_dlq_queues, sender=app, weak=False)
    return tracker


def _add_dlq_queues(sender: Celery, **kwargs: Any) -> None:
    # Queues added after Celery built its queue map are not in the default
    # consume set, so a worker started without -Q still skips the DLQs.
    from .dlq import dlq_queue

    app = sender
    tracker = get_tracker(app)
    if not tracker.config.dlq_in_task_queues:
        return
    queues = app.amqp.queues
    suffix = tracker.config.dlq_suffix
    for name in [name for name in list(queues) if not name.endswith(suffix)]:
        if tracker.dlq_name(name) not in queues:
            queues.add(dlq_queue(tracker.dlq_name(name)))
    app.conf.task_queues = list(queues.values())


def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    # Fail at start-up, not on the first task, when settings are wrong or the
    # store is unreachable. Then close the client so no pool child inherits it.
    tracker = getattr(getattr(sender, "app", None), _ATTRIBUTE, None)
    if tracker is None:
        return
    config = tracker.config
    try:
        tracker.store.ensure_indexes()
    except TaskTrackerError as exc:
        logger.warning("tasktracker: could not create indexes at start-up: %s", exc)
    finally:
        tracker.store.close()
    logger.info(
        "tasktracker: tracking executions in %s, collection %r",
        config.masked_uri, config.collection,
    )
