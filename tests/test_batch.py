"""send_group(): a group's tracked members recorded in one store write, no worker running."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery, chord, group

import celery_tasktracker
from celery_tasktracker import get_tracker, send_group
from celery_tasktracker.testing import StoreCommandCounter, free_port
from tests.app import make_app
from tests.harness import RESULT_BACKEND, unique_name


def records(app: Celery, **query: Any) -> list[dict[str, Any]]:
    return list(get_tracker(app).store.collection.find(query, {"_id": 0}))


def counted_app(build: Callable[..., Celery], database: str,
                **kwargs: Any) -> tuple[Celery, StoreCommandCounter]:
    counter = StoreCommandCounter()
    app = build(database=database, **kwargs)
    celery_tasktracker.install(app, event_listeners=[counter])
    get_tracker(app).store.ensure_indexes()
    counter.take()
    return app, counter


def labels(counter: StoreCommandCounter) -> list[str]:
    return [label for _thread, label, _command in counter.take()]


def test_send_group_inserts_once(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app, counter = counted_app(make_tracked_app, database)
    double = app.tasks["tests.double"]

    result = send_group(group(double.s("g", value) for value in range(4)))

    assert labels(counter) == ["insert 4 documents"]
    stored = {d["celeryTaskId"]: d for d in records(app)}
    assert set(stored) == {member.id for member in result.results}
    assert {d["status"] for d in stored.values()} == {"queued"}


def test_send_group_members_not_deduplicated(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app, _counter = counted_app(make_tracked_app, database)
    double = app.tasks["tests.double"]

    result = send_group(group(double.s("same", 1), double.s("same", 1)))

    stored = records(app)
    assert len(result.results) == 2
    assert len(stored) == 2
    assert {d["active"] for d in stored} == {False}
    assert stored[0]["taskId"] == stored[1]["taskId"]


def test_send_group_skips_untracked_members(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app, counter = counted_app(make_tracked_app, database)

    send_group(group(app.tasks["tests.double"].s("t", 1), app.tasks["tests.plain"].s("p")))

    assert labels(counter) == ["insert"]
    assert [d["taskName"] for d in records(app)] == ["tests.double"]


def test_send_group_chord_header_in_one_write(mongodb_uri: str, database: str) -> None:
    app = make_app(broker_url="redis://127.0.0.1:6379/14", mongodb_uri=mongodb_uri,
                   database=database, queue=unique_name("ttq"), result_backend=RESULT_BACKEND)
    counter = StoreCommandCounter()
    celery_tasktracker.install(app, event_listeners=[counter])
    get_tracker(app).store.ensure_indexes()
    counter.take()
    double, total = app.tasks["tests.double"], app.tasks["tests.total"]

    send_group(chord([double.s("c", 1), double.s("c", 2)], total.s("c-total")))

    assert labels(counter) == ["insert 2 documents"]
    assert sorted(d["taskName"] for d in records(app)) == ["tests.double", "tests.double"]


def test_send_group_partial_args_sent_singly(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app, counter = counted_app(make_tracked_app, database)
    total = app.tasks["tests.total"]

    send_group(group(total.s("a"), total.s("b")), args=([1, 2],))

    assert labels(counter) == ["insert", "insert"]
    stored = records(app)
    assert len(stored) == 2
    assert {d["taskId"] for d in stored} == {
        total.build_task_key(([1, 2], "a")).task_id,
        total.build_task_key(([1, 2], "b")).task_id,
    }


def test_send_group_failed_publish_releases(
    mongodb_uri: str, database: str,
) -> None:
    app = make_app(broker_url=f"redis://127.0.0.1:{free_port()}/0", mongodb_uri=mongodb_uri,
                   database=database, queue=unique_name("ttq"))
    app.conf.broker_connection_retry = False
    app.conf.task_publish_retry = False
    double = app.tasks["tests.double"]

    with pytest.raises(Exception, match=r"(?i)connect"):
        send_group(group(double.s("f", value) for value in range(3)))

    stored = records(app)
    assert [d["status"] for d in stored] == ["failed"]
    assert stored[0]["errorMessage"].startswith("publish failed")


def test_send_group_eager_runs_untracked(
    make_tracked_app: Callable[..., Celery], database: str,
) -> None:
    app, counter = counted_app(make_tracked_app, database)
    app.conf.task_always_eager = True
    double = app.tasks["tests.double"]

    result = send_group(group(double.s("e", 1), double.s("e", 2)))

    assert result.get() == [2, 4]
    assert labels(counter) == []


def test_send_group_deletes_unused_records(
    make_tracked_app: Callable[..., Celery], database: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, counter = counted_app(make_tracked_app, database)
    double = app.tasks["tests.double"]
    # As if Celery had published every member under a new celery task id.
    monkeypatch.setattr("celery_tasktracker.task.take_prepared_header",
                        lambda *args, **kwargs: None)

    result = send_group(group(double.s("u", value) for value in range(3)))

    assert labels(counter) == ["insert 3 documents", "insert", "insert", "insert",
                               "delete unused records"]
    stored = records(app)
    assert {d["celeryTaskId"] for d in stored} == {member.id for member in result.results}
    assert len(stored) == 3
