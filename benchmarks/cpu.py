"""Measure the extension's CPU time per task on the producer and on the worker.

Run it as ``python benchmarks/cpu.py``. The method:

* Producer side: ``apply_async`` on kombu's in-process ``memory://``
  transport, so no broker round trip is timed, for a plain Celery task and a
  tracked task of the same app and signature. The extension's cost is the
  difference.
* Worker side: the trace function that a pool process runs for each
  delivery (``celery.app.trace.build_tracer``), with prepared requests, for
  the same two tasks.
* Store round trips are excluded by giving the store a null client whose
  collection accepts every write and reports one match. Its own cost per
  call is measured and subtracted. Everything else the extension does (the
  taskId, the record, routing, the claim and outcome logic, signals,
  counters) is counted.
* CPU time is ``time.process_time()`` of this process; each figure is the
  median of several alternating rounds.

A second section repeats both sides with the MongoDB test server, which runs
in another process. There the CPU figures add pymongo's encoding and socket
work in this process. The wall-clock figures add the server's latency, which
is SecantusDB's and not MongoDB's.
"""

from __future__ import annotations

import gc
import itertools
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import pymongo
from benchlib import median, print_environment, unique_name
from celery import Celery
from celery.app.trace import build_tracer

import celery_tasktracker
from celery_tasktracker import TrackedTask, get_tracker
from celery_tasktracker.publish import build_document
from celery_tasktracker.store import MongoStore
from celery_tasktracker.store.base import utcnow
from celery_tasktracker.testing import MongoTestServer

#: Sends or deliveries per round with the null client, and rounds per figure.
NULL_TASKS = 10_000
NULL_ROUNDS = 5
#: Sends or deliveries per round with the MongoDB test server.
STORE_TASKS = 500
STORE_ROUNDS = 3

_numbers = itertools.count()


class _Result:
    """A pymongo write result for one matched document."""

    matched_count = 1
    modified_count = 1
    deleted_count = 0
    inserted_id = None


class NullCollection:
    """A collection that accepts every write and reports one matched document."""

    name = "task_tracker"

    def insert_one(self, document: Mapping[str, Any]) -> _Result:
        return _Result()

    def insert_many(self, documents: Any, ordered: bool = True) -> _Result:
        return _Result()

    def update_one(self, query: Mapping[str, Any], update: Mapping[str, Any]) -> _Result:
        return _Result()

    def update_many(self, query: Mapping[str, Any], update: Mapping[str, Any]) -> _Result:
        return _Result()

    def create_indexes(self, models: Any) -> list[str]:
        return []


class NullDatabase:
    """Builds a real pymongo Collection, as the store does, but hands out a null one."""

    def __init__(self, database: pymongo.database.Database[Any]) -> None:
        self.database = database
        self.name = database.name

    def get_collection(self, name: str) -> NullCollection:
        self.database.get_collection(name)
        return NullCollection()


class NullClient:
    """A client that never connects: its collections are null collections."""

    def __init__(self) -> None:
        # connect=False: pymongo opens no socket until an operation runs,
        # and none does.
        self.client: pymongo.MongoClient[Any] = pymongo.MongoClient(
            "mongodb://127.0.0.1:9", connect=False, tz_aware=True)

    def get_database(self, name: str | None = None) -> NullDatabase:
        return NullDatabase(self.client.get_database(name))

    def get_default_database(self, default: str | None = None) -> NullDatabase:
        return NullDatabase(self.client.get_default_database(default))

    def close(self) -> None:
        self.client.close()


class NullStore(MongoStore):
    """The real store, connected to a null client instead of a server."""

    def _connect(self) -> Any:
        return NullClient()


def null_call_cost() -> float:
    """Return the CPU microseconds of one call of the null collection."""
    collection = NullCollection()
    calls = 200_000
    started = time.process_time()
    for _ in range(calls):
        collection.update_one({}, {})
    return (time.process_time() - started) / calls * 1e6


def build_app(mongodb_uri: str, database: str, *, null_store: bool) -> Celery:
    """Build an app with three tasks whose bodies do the same nothing."""
    app = Celery("bench_cpu", broker="memory://", set_as_current=True)
    app.conf.update(task_ignore_result=True, task_default_queue="bench_cpu",
                    tasktracker_mongodb_uri=mongodb_uri, tasktracker_database=database)
    celery_tasktracker.install(app)

    @app.task(shared=False, name="cpu.plain")
    def plain(n: int, label: str) -> int:
        return n

    @app.task(shared=False, base=TrackedTask, name="cpu.tracked")
    def tracked(n: int, label: str) -> int:
        return n

    class TrackingOff(TrackedTask):
        tracking_enabled = False

    @app.task(shared=False, base=TrackingOff, name="cpu.tracking_off")
    def tracking_off(n: int, label: str) -> int:
        return n

    app.finalize()
    tracker = get_tracker(app)
    if null_store:
        tracker._store = NullStore(tracker.config)
    tracker.store.ensure_indexes()
    return app


def time_sends(app: Celery, task_name: str, count: int) -> tuple[float, float]:
    """Send *count* tasks; return CPU and wall microseconds per send."""
    task = app.tasks[task_name]
    numbers = [next(_numbers) for _ in range(count)]
    with app.producer_or_acquire() as producer:
        gc.collect()
        cpu, wall = time.process_time(), time.perf_counter()
        for number in numbers:
            task.apply_async((number, "cpu"), producer=producer)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / count * 1e6, wall / count * 1e6


def _requests(app: Celery, task_name: str, count: int) -> list[tuple[str, tuple[Any, ...],
                                                                     dict[str, Any]]]:
    # Requests as a pool process receives them; tracked ones carry the
    # tracking header of a record inserted beforehand.
    task = app.tasks[task_name]
    store = get_tracker(app).store
    prepared = []
    for _ in range(count):
        celery_task_id = str(uuid.uuid4())
        args = (next(_numbers), "cpu")
        request: dict[str, Any] = {
            "id": celery_task_id, "task": task_name, "retries": 0,
            "hostname": "bench@cpu", "is_eager": False, "args": args, "kwargs": {},
            "delivery_info": {"exchange": "", "routing_key": "bench_cpu",
                              "redelivered": False},
        }
        if isinstance(task, TrackedTask) and task.tracking_enabled:
            document = build_document(
                key=task.build_task_key(args, {}), task_name=task_name,
                celery_task_id=celery_task_id, queue="bench_cpu", attempt=0, now=utcnow(),
                dedup_window=300,
            )
            store.insert(document)
            request["tasktracker"] = {"v": 1, "taskId": document["taskId"],
                                      "executionId": document["executionId"], "attempt": 0}
        prepared.append((celery_task_id, args, request))
    return prepared


def time_deliveries(app: Celery, task_name: str, count: int) -> tuple[float, float]:
    """Run *count* deliveries through the worker's trace; return CPU and wall microseconds."""
    task = app.tasks[task_name]
    tracer = build_tracer(task_name, task, eager=False, propagate=True, app=app,
                          hostname="bench@cpu")
    requests = _requests(app, task_name, count)
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    for celery_task_id, args, request in requests:
        tracer(celery_task_id, args, {}, request)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / count * 1e6, wall / count * 1e6


def measure(
    timer: Callable[[Celery, str, int], tuple[float, float]], app: Celery,
    task_names: list[str], count: int, rounds: int,
) -> dict[str, tuple[float, float]]:
    """Return the median CPU and wall microseconds of each task, rounds alternating."""
    for name in task_names:
        timer(app, name, max(count // 10, 10))
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in task_names}
    for round_number in range(rounds):
        order = task_names if round_number % 2 == 0 else list(reversed(task_names))
        for name in order:
            samples[name].append(timer(app, name, count))
    return {name: (median([cpu for cpu, _ in values]), median([wall for _, wall in values]))
            for name, values in samples.items()}


def print_side(title: str, figures: dict[str, tuple[float, float]], store_calls: int,
               call_cost: float, *, wall: bool) -> None:
    plain_cpu, plain_wall = figures["cpu.plain"]
    tracked_cpu, tracked_wall = figures["cpu.tracked"]
    print(title)
    rows = (("plain Celery task", "cpu.plain"),
            ("tracked base class, tracking off", "cpu.tracking_off"),
            ("tracked task", "cpu.tracked"))
    for label, name in rows:
        cpu, wall_time = figures[name]
        line = f"    {label:<34} {cpu:8.1f} us CPU"
        if wall:
            line += f"   {wall_time:8.1f} us wall"
        print(line)
    extension = tracked_cpu - plain_cpu - store_calls * call_cost
    print(f"    {'extension CPU per task':<34} {extension:8.1f} us"
          + (f"   (null client calls subtracted: {store_calls} x {call_cost:.2f} us)"
             if call_cost else ""))
    print(f"    {'tracked / plain CPU':<34} {tracked_cpu / plain_cpu:8.2f}"
          + (f"   wall {tracked_wall / plain_wall:.2f}" if wall else ""))


def main() -> int:
    started = time.monotonic()
    names = ["cpu.plain", "cpu.tracking_off", "cpu.tracked"]
    with MongoTestServer() as server:
        print_environment(brokers=["memory:// (kombu's in-process transport)"],
                          store_uri=server.uri)

        call_cost = null_call_cost()
        app = build_app(server.uri, unique_name("bench_cpu"), null_store=True)
        print(f"Null client: {call_cost:.2f} us CPU per collection call. Medians of "
              f"{NULL_ROUNDS} rounds of {NULL_TASKS} tasks.")
        print_side("  Producer side: apply_async, store calls to the null client",
                   measure(time_sends, app, names, NULL_TASKS, NULL_ROUNDS),
                   store_calls=1, call_cost=call_cost, wall=False)
        print_side("  Worker side: one delivery through the pool's trace (claim, body, "
                   "outcome)", measure(time_deliveries, app, names, NULL_TASKS, NULL_ROUNDS),
                   store_calls=2, call_cost=call_cost, wall=False)
        print()

        app = build_app(server.uri, unique_name("bench_cpu"), null_store=False)
        print(f"With the MongoDB test server (SecantusDB; its latency is not MongoDB's). "
              f"Medians of {STORE_ROUNDS} rounds of {STORE_TASKS} tasks.")
        print_side("  Producer side: apply_async, 1 store round trip per tracked send",
                   measure(time_sends, app, names, STORE_TASKS, STORE_ROUNDS),
                   store_calls=0, call_cost=0.0, wall=True)
        print_side("  Worker side: one delivery, 2 store round trips per tracked delivery",
                   measure(time_deliveries, app, names, STORE_TASKS, STORE_ROUNDS),
                   store_calls=0, call_cost=0.0, wall=True)
    print()
    print(f"Finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
