"""The partner sync Celery app, configured from ``TASKTRACKER_DEMO_*`` environment variables.

Workers, Flower and the demo load it with
``-A example_project.partner_sync.celery_app``. Every setting they must
share comes from the environment (see :mod:`.environment`), so a worker
started by the demo and one started by hand behave alike.
"""

from __future__ import annotations

from celery import Celery

import celery_tasktracker

from .environment import QUEUE, app_settings

__all__ = ["app", "create_app"]


def create_app() -> Celery:
    """Build the app from the environment and install celery_tasktracker on it.

    Raises:
        ImproperlyConfigured: naming the missing environment variable or folder.
    """
    celery = Celery("partner_sync", include=["example_project.partner_sync.tasks"])
    celery.conf.update(
        **app_settings(),
        broker_connection_retry_on_startup=True,
        task_default_queue=QUEUE,
        # Outcomes live in the tracker records, so no result backend is needed.
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
    )
    celery_tasktracker.install(celery)
    return celery


app = create_app()
