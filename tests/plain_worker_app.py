"""The test tasks without the extension, as a worker that never installed it runs them."""

from __future__ import annotations

import os

from tests.app import make_app

app = make_app(
    broker_url=os.environ["TT_BROKER_URL"],
    mongodb_uri=os.environ["TT_MONGODB_URI"],
    database=os.environ["TT_DATABASE"],
    queue=os.environ["TT_QUEUE"],
    tracked=False,
)
