"""Compare sending a group of tracked tasks with send_group() against group.apply_async().

Run it as ``python benchmarks/batch.py [--size N] [--rounds R]``. Each round
sends a group of N tracked tasks to a Redis queue that no worker consumes,
once with ``celery_tasktracker.send_group`` (the members' records in one
``insert_many``) and once with ``group.apply_async`` (one insert per
member). A group of N plain tasks is the untracked reference. The figures
are medians of the wall-clock time to send, and the store round trips
counted with pymongo command monitoring.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import benchapp
from benchlib import (
    REDIS_URL,
    delete_queues,
    median,
    print_environment,
    unique_name,
)
from celery import Celery, group
from pymongo import monitoring

from celery_tasktracker import send_group
from celery_tasktracker.testing import MongoTestServer, StoreCommandCounter


class StoreTime(monitoring.CommandListener):
    """Add up the time the store took to reply, as pymongo measures it."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self.seconds += event.duration_micros / 1e6

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.seconds += event.duration_micros / 1e6

    def take(self) -> float:
        """Return the seconds added up since the last call and start again from zero."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def send_plain(app: Celery, size: int) -> Any:
    return group(app.tasks["bench.plain"].s(n, "bench:batch") for n in range(size)) \
        .apply_async()


def send_tracked_one_by_one(app: Celery, size: int) -> Any:
    return group(app.tasks["bench.tracked"].s(n, "bench:batch") for n in range(size)) \
        .apply_async()


def send_tracked_batched(app: Celery, size: int) -> Any:
    return send_group(group(app.tasks["bench.tracked"].s(n, "bench:batch")
                            for n in range(size)))


WAYS: dict[str, Callable[[Celery, int], Any]] = {
    "plain group.apply_async()": send_plain,
    "tracked group.apply_async()": send_tracked_one_by_one,
    "tracked send_group()": send_tracked_batched,
}


Figures = dict[str, tuple[float, float, collections.Counter[str]]]


def measure(app: Celery, counter: StoreCommandCounter, store_time: StoreTime, queue: str,
            size: int, rounds: int) -> Figures:
    """Return the median send and store seconds, and the round trips of one send, per way."""
    names = list(WAYS)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    in_store: dict[str, list[float]] = {name: [] for name in names}
    trips: dict[str, collections.Counter[str]] = {}
    for round_number in range(rounds):
        order = names if round_number % 2 == 0 else list(reversed(names))
        for name in order:
            counter.take()
            store_time.take()
            started = time.perf_counter()
            WAYS[name](app, size)
            seconds[name].append(time.perf_counter() - started)
            in_store[name].append(store_time.take())
            trips[name] = collections.Counter(label for _, label, _ in counter.take())
            # Keep the queue short: nothing consumes it.
            delete_queues(REDIS_URL, [queue])
    return {name: (median(seconds[name]), median(in_store[name]), trips[name])
            for name in names}


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1000,
                        help="tasks in each group (default: 1000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per way of sending (default: 3)")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    arguments = parse_arguments(argv)
    started = time.monotonic()
    with MongoTestServer() as server:
        print_environment(brokers=[REDIS_URL], store_uri=server.uri)
        counter = StoreCommandCounter()
        store_time = StoreTime()
        queue = unique_name("bench_batch")
        app = benchapp.make_app(broker_url=REDIS_URL, mongodb_uri=server.uri,
                                database=queue, queue=queue,
                                event_listeners=[counter, store_time])
        app.tasks["bench.tracked"].tracker.store.ensure_indexes()
        # One small send of each way first, so connections are open.
        for way in WAYS.values():
            way(app, 10)
        delete_queues(REDIS_URL, [queue])
        try:
            figures = measure(app, counter, store_time, queue, arguments.size,
                              arguments.rounds)
        finally:
            delete_queues(REDIS_URL, [queue])

    one_by_one = figures["tracked group.apply_async()"][0]
    print(f"A group of {arguments.size} tasks, median of {arguments.rounds} rounds")
    print(f"    {'way':<30} {'send s':>8} {'in store s':>11} {'per task ms':>12} "
          f"{'round trips':>12}")
    for name, (seconds, store_seconds, trips) in figures.items():
        print(f"    {name:<30} {seconds:>8.2f} {store_seconds:>11.2f} "
              f"{seconds / arguments.size * 1000:>12.3f} {sum(trips.values()):>12}")
    batched = figures["tracked send_group()"][0]
    print(f"    send_group() / group.apply_async() send time: {batched / one_by_one:.2f} "
          f"({one_by_one / batched:.1f}x faster)")
    print()
    print(f"Finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
