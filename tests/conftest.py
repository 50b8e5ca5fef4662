"""Shared fixtures: the MongoDB test server, brokers and tracked apps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pymongo
import pytest
from celery import Celery

from celery_tasktracker.testing import MongoTestServer
from tests.app import make_app
from tests.harness import BROKERS, unique_name


@pytest.fixture(scope="session")
def mongodb_uri() -> Iterator[str]:
    """URI of the MongoDB-compatible server of this test session."""
    with MongoTestServer() as server:
        yield server.uri


@pytest.fixture(scope="session")
def mongo_client(mongodb_uri: str) -> Iterator[pymongo.MongoClient]:
    client: pymongo.MongoClient = pymongo.MongoClient(mongodb_uri, tz_aware=True)
    yield client
    client.close()


@pytest.fixture
def database(mongo_client: pymongo.MongoClient) -> Iterator[str]:
    """A database name used by one test only; dropped afterwards."""
    name = unique_name("tt").replace("-", "_")
    yield name
    mongo_client.drop_database(name)


@pytest.fixture
def make_tracked_app(mongodb_uri: str) -> Callable[..., Celery]:
    """Build a tracked test app; the broker defaults to Redis."""

    def build(*, database: str, queue: str | None = None, broker: str = "redis",
              **kwargs: Any) -> Celery:
        return make_app(
            broker_url=BROKERS[broker], mongodb_uri=mongodb_uri, database=database,
            queue=queue or unique_name("ttq"), **kwargs,
        )

    return build
