"""The business collections of the partner sync app, in the tracker's database."""

from __future__ import annotations

import os
import threading
from typing import Any

import pymongo
from celery import Celery
from pymongo.collection import Collection

__all__ = ["API_REQUESTS", "FLIGHT_LOGS", "collection"]

#: Synced flight logs, one document per log, with a ``syncCount`` counter.
FLIGHT_LOGS = "flight_logs"
#: Request log of the simulated partner API, one document per log request.
API_REQUESTS = "partner_api_requests"

_lock = threading.Lock()
_clients: dict[int, pymongo.MongoClient[dict[str, Any]]] = {}


def _client(uri: str) -> pymongo.MongoClient[dict[str, Any]]:
    # One client per process: a prefork child must not reuse a client
    # created in the parent before the fork.
    pid = os.getpid()
    with _lock:
        client = _clients.get(pid)
        if client is None:
            client = pymongo.MongoClient(uri, tz_aware=True, connect=False,
                                         appname="partner-sync")
            _clients[pid] = client
        return client


def collection(app: Celery, name: str) -> Collection[dict[str, Any]]:
    """Return collection *name* of the database that the tracker of *app* uses."""
    client = _client(app.conf.tasktracker_mongodb_uri)
    return client[app.conf.tasktracker_database][name]
