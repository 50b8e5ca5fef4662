"""The fault-test app as loaded by worker processes: ``celery -A tests.fault_worker_app``."""

from __future__ import annotations

import os

from tests.fault_app import FaultSettings, make_fault_app

app = make_fault_app(FaultSettings.from_env(os.environ))
