"""The test app as loaded by worker processes: ``celery -A tests.worker_app worker``."""

from __future__ import annotations

import json
import os

from tests.app import make_app

app = make_app(
    broker_url=os.environ["TT_BROKER_URL"],
    mongodb_uri=os.environ["TT_MONGODB_URI"],
    database=os.environ["TT_DATABASE"],
    queue=os.environ["TT_QUEUE"],
    result_backend=os.environ.get("TT_RESULT_BACKEND") or None,
    extra_conf=json.loads(os.environ.get("TT_EXTRA_CONF") or "{}"),
)

if os.environ.get("TT_FAULTY_RECEIVER"):
    from celery_tasktracker import signals

    def _faulty_receiver(sender: object, **kwargs: object) -> None:
        raise RuntimeError("faulty receiver for taskId=" + str(kwargs.get("task_id")))

    for _signal in (signals.execution_claimed, signals.execution_completed):
        _signal.connect(_faulty_receiver, weak=False)
