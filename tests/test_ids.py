"""taskId and executionId: equalities, inequalities and validation."""

from __future__ import annotations

import datetime as dt
import decimal
import subprocess
import sys
import uuid
from typing import Any

import pytest
from celery import Celery

from celery_tasktracker import TrackedTask, install
from celery_tasktracker.exceptions import InvalidTaskIdError, TaskIdError
from celery_tasktracker.ids import (
    MAX_TASK_ID_LENGTH,
    build_task_id,
    canonical_encode,
    new_execution_id,
    render_part,
    validate_execution_id,
    validate_task_id,
)


@pytest.fixture(scope="module")
def app() -> Celery:
    app = Celery("ids", broker="memory://", set_as_current=False)
    app.conf.tasktracker_mongodb_uri = "mongodb://127.0.0.1:1"
    install(app)

    @app.task(base=TrackedTask, name="ids.notify")
    def notify(user_id: Any, channel: str = "email") -> None:
        pass

    @app.task(base=TrackedTask, bind=True, name="ids.bound")
    def bound(self: Any, user_id: Any, channel: str = "email") -> None:
        pass

    @app.task(base=TrackedTask, name="ids.sync", tracking_namespace="partner_tasks",
              tracking_key_args=("partner", "aircraft_id", "log_id"))
    def sync(partner: str, aircraft_id: str, log_id: str, payload: Any = None) -> None:
        pass

    @app.task(base=TrackedTask, name="ids.varargs")
    def varargs(*items: Any, **options: Any) -> None:
        pass

    @app.task(base=TrackedTask, name="ids.by_func",
              tracking_key_func=lambda order, *rest, **kw: ("order", order["id"]))
    def by_func(order: dict[str, Any], note: str = "") -> None:
        pass

    return app


def key(app: Celery, name: str, *args: Any, **kwargs: Any) -> str:
    return app.tasks[name].build_task_key(args, kwargs).task_id


def test_defaults_and_keywords_give_one_task_id(app: Celery) -> None:
    expected = key(app, "ids.notify", 5)

    assert key(app, "ids.notify", user_id=5) == expected
    assert key(app, "ids.notify", 5, "email") == expected
    assert key(app, "ids.notify", channel="email", user_id=5) == expected
    assert key(app, "ids.notify", 5, channel="email") == expected


def test_other_argument_value_gives_other_task_id(app: Celery) -> None:
    assert key(app, "ids.notify", 5, channel="sms") != key(app, "ids.notify", 5)
    assert key(app, "ids.notify", 6) != key(app, "ids.notify", 5)


def test_int_and_str_give_different_task_ids(app: Celery) -> None:
    assert key(app, "ids.notify", 5) != key(app, "ids.notify", "5")
    assert key(app, "ids.sync", "SATLOC", 5, "1") != key(app, "ids.sync", "SATLOC", "5", "1")


def test_bound_task_self_not_in_key(app: Celery) -> None:
    assert key(app, "ids.bound", 5) == key(app, "ids.bound", user_id=5, channel="email")
    assert key(app, "ids.bound", 5).startswith("ids.bound:")


def test_namespace_defaults_to_task_name(app: Celery) -> None:
    assert key(app, "ids.notify", 5).startswith("ids.notify:")


def test_named_key_args_build_readable_key(app: Celery) -> None:
    task_id = key(app, "ids.sync", "SATLOC", "695d", "02220710", payload={"a": 1})

    assert task_id == "partner_tasks:SATLOC:695d:02220710"


def test_named_key_args_ignore_other_arguments(app: Celery) -> None:
    first = key(app, "ids.sync", "SATLOC", "695d", "1", payload={"a": 1})
    second = key(app, "ids.sync", "SATLOC", "695d", "1", payload={"a": 2})

    assert first == second


def test_key_func_decides_parts(app: Celery) -> None:
    task_id = key(app, "ids.by_func", {"id": 42, "lines": [1, 2]}, note="x")

    assert task_id == "ids.by_func:order:42"


def test_unknown_key_arg_raises_with_parameter_names(app: Celery) -> None:
    task = app.tasks["ids.sync"]
    original = task.tracking_key_args
    task.tracking_key_args = ("partner", "tail_number")
    try:
        with pytest.raises(TaskIdError, match="tail_number"):
            task.build_task_key(("SATLOC", "695d", "1"), {})
    finally:
        task.tracking_key_args = original


def test_arguments_not_matching_signature_raise(app: Celery) -> None:
    with pytest.raises(TaskIdError, match="do not match the signature"):
        key(app, "ids.notify", 1, 2, 3)


def test_varargs_and_varkw_are_keyed(app: Celery) -> None:
    assert key(app, "ids.varargs", 1, 2, a=1, b=2) == key(app, "ids.varargs", 1, 2, b=2, a=1)
    assert key(app, "ids.varargs", 1, 2) != key(app, "ids.varargs", 2, 1)


def test_parts_cannot_join_into_same_key() -> None:
    assert build_task_id("ns", ["a:b", "c"]) != build_task_id("ns", ["a", "b:c"])
    assert build_task_id("ns", ["a%3Ab"]) != build_task_id("ns", ["a:b"])
    assert build_task_id("ns", ["", "x"]) != build_task_id("ns", ["x"])
    assert build_task_id("ns", [None]) != build_task_id("ns", ["~none"])


@pytest.mark.parametrize("value", [
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
    dt.date(2026, 1, 2),
    decimal.Decimal("10.50"),
    b"\x00\xffdata",
    (1, "a", None),
    {3, 1, 2},
    {"b": {"y": [1, 2], "x": 1.5}, "a": True},
])
def test_typed_values_render_injectively(value: Any) -> None:
    rendered = render_part(value)

    assert ":" not in rendered
    assert render_part(value) == rendered
    assert render_part(str(value)) != rendered


def test_equal_values_encode_alike() -> None:
    assert canonical_encode(decimal.Decimal("1.50")) == canonical_encode(decimal.Decimal("1.5"))
    assert canonical_encode((1, 2)) == canonical_encode([1, 2])
    assert canonical_encode({"a": 1, "b": 2}) == canonical_encode({"b": 2, "a": 1})
    assert canonical_encode({1, 2, 3}) == canonical_encode({3, 2, 1})
    utc = dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc)
    plus_two = utc.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert canonical_encode(utc) == canonical_encode(plus_two)


def test_distinct_values_encode_differently() -> None:
    values = [5, "5", 5.0, True, None, b"5", [5], {"5": 5}, decimal.Decimal(5), "", []]
    encoded = [canonical_encode(value) for value in values]

    assert len(set(encoded)) == len(values)


def test_unsupported_type_raises_with_fix() -> None:
    with pytest.raises(TaskIdError, match="tracking_key_args"):
        canonical_encode(object())


def test_keys_stable_across_processes(app: Celery) -> None:
    args = (uuid.UUID(int=7), dt.datetime(2026, 5, 1, tzinfo=dt.timezone.utc),
            decimal.Decimal("2.10"), {"nested": {"z": 1, "a": (1, 2)}}, b"raw")
    script = (
        "import datetime, uuid\n"
        "from decimal import Decimal\n"
        "from uuid import UUID\n"
        "from celery_tasktracker.ids import canonical_digest\n"
        f"print(canonical_digest({args!r}))\n"
    )
    # A new interpreter has another hash seed, so anything relying on
    # hash() or set order would differ here.
    output = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
    ).stdout.strip()

    from celery_tasktracker.ids import canonical_digest
    assert output == canonical_digest(args)


def test_long_key_is_shortened_with_digest() -> None:
    long_part = "x" * 500

    shortened = build_task_id("ns", [long_part])

    assert len(shortened) <= MAX_TASK_ID_LENGTH
    assert shortened.startswith("ns:xxx")
    assert shortened != build_task_id("ns", [long_part + "y"])
    assert validate_task_id(shortened) == shortened


def test_invalid_namespace_raises() -> None:
    with pytest.raises(InvalidTaskIdError, match="namespace 'bad ns'"):
        build_task_id("bad ns", ["a"])


def test_execution_id_is_uuid4() -> None:
    value = new_execution_id()

    assert uuid.UUID(value).version == 4
    assert validate_execution_id(value) == value
    assert new_execution_id() != value


@pytest.mark.parametrize("value", [
    "not-a-uuid", str(uuid.uuid1()), str(uuid.uuid4()).upper(), 42, None,
])
def test_validate_execution_id_rejects(value: Any) -> None:
    with pytest.raises(InvalidTaskIdError, match="executionId"):
        validate_execution_id(value)


@pytest.mark.parametrize("value", ["", "has space:x", "ns:a b", 7, "x" * 300])
def test_validate_task_id_rejects(value: Any) -> None:
    with pytest.raises(InvalidTaskIdError, match="taskId"):
        validate_task_id(value)


def test_validate_task_id_accepts_built_keys(app: Celery) -> None:
    task_id = key(app, "ids.sync", "SAT LOC", "a:b", "%")

    assert validate_task_id(task_id) == task_id


def test_string_key_args_rejected_with_fix(app: Celery) -> None:
    task = app.tasks["ids.sync"]
    original = task.tracking_key_args
    task.tracking_key_args = "partner"
    try:
        with pytest.raises(TaskIdError, match=r"\('partner',\)"):
            task.build_task_key(("SATLOC", "695d", "1"), {})
    finally:
        task.tracking_key_args = original
