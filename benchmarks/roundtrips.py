"""Count the store round trips of each task lifecycle with pymongo command monitoring.

Run it as ``python benchmarks/roundtrips.py``. A ``CommandListener`` is
attached to the tracker's MongoClient, and an in-process solo worker
consumes the queue in its own thread, so every command is attributed to the
producer (the main thread) or to the worker (any other thread). Index
creation happens once per process at start-up and is reported apart.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import benchapp
import pymongo
from benchlib import (
    COLLECTION,
    REDIS_URL,
    delete_queues,
    describe_counts,
    print_environment,
    unique_name,
    wait_for,
)
from celery import Celery, group
from celery.contrib.testing.worker import start_worker
from celery.signals import before_task_publish

from celery_tasktracker import send_group
from celery_tasktracker.testing import MongoTestServer, StoreCommandCounter, count_by_side

#: Members of the group whose send is counted one by one and batched.
GROUP_SIZE = 10

#: Lease of the lease renewal run; the worker renews every third of it.
RENEWAL_LEASE = 3.0
#: Seconds each task of the lease renewal run keeps running.
RENEWAL_TASK_SECONDS = 3.4

Records = pymongo.collection.Collection[dict[str, Any]]


class Lifecycle:
    """One measured lifecycle: what the producer and the worker sent."""

    def __init__(
        self, name: str, floor: int, commands: list[tuple[str, str, Mapping[str, Any]]],
    ) -> None:
        self.name = name
        #: The minimum round trips the design allows for this lifecycle.
        self.floor = floor
        self.producer, self.worker = count_by_side(commands)

    @property
    def total(self) -> int:
        return sum(self.producer.values()) + sum(self.worker.values())


def _record(records: Records, celery_task_id: str) -> dict[str, Any] | None:
    return records.find_one({"celeryTaskId": celery_task_id}, sort=[("createdAt", -1)])


def _wait_status(records: Records, celery_task_id: str, status: str) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: (record := _record(records, celery_task_id)) and record["status"] == status
        and record,
        timeout=30, message=f"celery task {celery_task_id} to be {status}",
    )


def _settle(counter: StoreCommandCounter) -> list[tuple[str, str, Mapping[str, Any]]]:
    # Let the worker finish the writes that follow the state we waited for.
    time.sleep(0.3)
    return counter.take()


def measure_success(app: Celery, counter: StoreCommandCounter, records: Records) -> Lifecycle:
    counter.take()
    result = app.tasks["bench.tracked"].delay(1, "bench:roundtrips")
    _wait_status(records, result.id, "completed")
    return Lifecycle("successful task", 3, _settle(counter))


def measure_retry(app: Celery, counter: StoreCommandCounter, records: Records) -> Lifecycle:
    counter.take()
    result = app.tasks["bench.flaky"].delay("retry-once", 1)
    wait_for(lambda: records.count_documents({"celeryTaskId": result.id,
                                              "status": "completed"}),
             timeout=30, message="the retried task to complete")
    return Lifecycle("task with one retry", 6, _settle(counter))


def measure_dedup_send(app: Celery, counter: StoreCommandCounter, records: Records) -> Lifecycle:
    sleep = app.tasks["bench.sleep"]
    first = sleep.delay("dedup", 1.0)
    _wait_status(records, first.id, "processing")
    counter.take()
    second = sleep.delay("dedup", 1.0)
    commands = counter.take()
    if second.id != first.id:
        raise RuntimeError("the second send was not deduplicated")
    _wait_status(records, first.id, "completed")
    _settle(counter)
    return Lifecycle("deduplicated send", 2, commands)


def measure_duplicate_delivery(
    app: Celery, counter: StoreCommandCounter, records: Records, queue: str,
) -> Lifecycle:
    published: list[dict[str, Any]] = []

    def capture(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
        published.append(dict(headers or {}))

    before_task_publish.connect(capture, weak=False)
    try:
        result = app.tasks["bench.tracked"].delay(2, "bench:roundtrips")
    finally:
        before_task_publish.disconnect(capture)
    _wait_status(records, result.id, "completed")
    _settle(counter)

    # The broker delivers the same message again: same celery task id and
    # tracking header.
    headers = published[-1]
    app.send_task(headers["task"], args=(2, "bench:roundtrips"), task_id=headers["id"],
                  queue=queue, headers={"tasktracker": headers["tasktracker"]})
    wait_for(lambda: (_record(records, result.id) or {}).get("duplicateDeliveries"),
             timeout=30, message="the duplicate delivery to be skipped")
    return Lifecycle("duplicate delivery", 3, _settle(counter))


def measure_dead_letter(app: Celery, counter: StoreCommandCounter, records: Records) -> Lifecycle:
    counter.take()
    result = app.tasks["bench.invalid"].delay("not-a-number")
    _wait_status(records, result.id, "dlq")
    return Lifecycle("dead-lettered task", 3, _settle(counter))


def measure_group(
    app: Celery, counter: StoreCommandCounter, records: Records, *, batched: bool,
) -> Lifecycle:
    tracked = app.tasks["bench.tracked"]
    base = 1000 if batched else 2000
    signature = group(tracked.s(base + i, "bench:roundtrips") for i in range(GROUP_SIZE))
    counter.take()
    result = send_group(signature) if batched else signature.apply_async()
    for member in result.results:
        _wait_status(records, member.id, "completed")
    name = f"group of {GROUP_SIZE}, " + ("send_group()" if batched else "group.apply_async()")
    return Lifecycle(name, 1 + 2 * GROUP_SIZE, _settle(counter))


def print_lifecycles(lifecycles: list[Lifecycle]) -> None:
    print("Store round trips per task lifecycle (one-time index creation excluded)")
    print(f"  {'lifecycle':<38} {'producer':>8} {'worker':>7} {'total':>6} {'floor':>6}")
    for item in lifecycles:
        print(f"  {item.name:<38} {sum(item.producer.values()):>8} "
              f"{sum(item.worker.values()):>7} {item.total:>6} {item.floor:>6}")
    print("  floor: the fewest round trips the design allows; docs/benchmarks.rst says why")
    print()
    for item in lifecycles:
        print(f"  {item.name}")
        print(f"    producer: {describe_counts(item.producer)}")
        print(f"    worker:   {describe_counts(item.worker)}")
    print()


def renewal_sizes(commands: list[tuple[str, str, Mapping[str, Any]]]) -> list[int]:
    """Return how many executions each lease renewal write covered."""
    sizes = []
    for _thread, label, command in commands:
        if label == "renew leases":
            query = (command.get("updates") or [{}])[0].get("q") or {}
            sizes.append(len(query["celeryTaskId"]["$in"]))
    return sizes


def measure_renewals(uri: str, running: int) -> list[int]:
    """Run *running* tasks at once on a thread-pool worker; return its renewal writes."""
    counter = StoreCommandCounter()
    queue = unique_name("bench_lease")
    app = benchapp.make_app(broker_url=REDIS_URL, mongodb_uri=uri, database=queue,
                            queue=queue, lease=RENEWAL_LEASE, event_listeners=[counter])
    records = pymongo.MongoClient(uri, tz_aware=True)[queue][COLLECTION]
    try:
        with start_worker(app, pool="threads", concurrency=8, perform_ping_check=False,
                          loglevel="WARNING", shutdown_timeout=30):
            sleep = app.tasks["bench.sleep"]
            counter.take()
            results = [sleep.delay(f"lease-{i}", RENEWAL_TASK_SECONDS) for i in range(running)]
            for result in results:
                _wait_status(records, result.id, "completed")
            return renewal_sizes(counter.take())
    finally:
        delete_queues(REDIS_URL, [queue])


def run_lifecycles(uri: str) -> list[Lifecycle]:
    counter = StoreCommandCounter()
    queue = unique_name("bench_rt")
    app = benchapp.make_app(broker_url=REDIS_URL, mongodb_uri=uri, database=queue,
                            queue=queue, event_listeners=[counter])
    records = pymongo.MongoClient(uri, tz_aware=True)[queue][COLLECTION]
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING",
                          shutdown_timeout=30):
            # The worker created the indexes at start-up; a first task warms up.
            startup = collections.Counter(label for _, label, _ in counter.take())
            measure_success(app, counter, records)
            print(f"One-time start-up, excluded below: {describe_counts(startup)} when the "
                  "worker starts. A producer process that never ran a worker creates the "
                  "indexes once, on its first send.")
            print()
            return [
                measure_success(app, counter, records),
                measure_retry(app, counter, records),
                measure_dedup_send(app, counter, records),
                measure_duplicate_delivery(app, counter, records, queue),
                measure_dead_letter(app, counter, records),
                measure_group(app, counter, records, batched=False),
                measure_group(app, counter, records, batched=True),
            ]
    finally:
        delete_queues(REDIS_URL, [queue, f"{queue}.dlq"])
        benchapp.counter_client().delete("bench:roundtrips")


def main() -> int:
    # The dead-lettered and retried tasks log their errors; the counts are the output.
    for name in ("celery.app.trace", "celery_tasktracker.dlq", "celery_tasktracker.task"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    started = time.monotonic()
    with MongoTestServer() as server:
        print_environment(brokers=[REDIS_URL], store_uri=server.uri)
        print_lifecycles(run_lifecycles(server.uri))

        print(f"Lease renewal: one bulk write per worker per interval (lease "
              f"{RENEWAL_LEASE:g} s, renewed every {RENEWAL_LEASE / 3:g} s, tasks running "
              f"{RENEWAL_TASK_SECONDS:g} s)")
        for running in (1, 8):
            sizes = measure_renewals(server.uri, running)
            print(f"  {running} running task(s): {len(sizes)} renewal write(s), executions "
                  f"per write {sizes}")
    print()
    print(f"Finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
