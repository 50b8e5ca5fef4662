"""Measure end-to-end throughput of tracked tasks against plain ones, on Redis and RabbitMQ.

Run it as ``python benchmarks/throughput.py [--tasks N] [--rounds R]``. For
each broker one worker process (prefork, two pool processes) consumes one
queue of one app, which has a plain task and a tracked task with the same
body: one Redis INCR on a run counter. Each round sends N tasks of one kind
from this process and waits until the counter reaches N; the kinds
alternate within the run so drift hits both. The figure is tasks per second
from the first send to the last completion, and the ratio is tracked over
plain.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence

import benchapp
from benchlib import (
    BROKERS,
    delete_queues,
    median,
    print_environment,
    running_worker,
    unique_name,
    wait_for,
)
from celery import Celery

from celery_tasktracker.testing import MongoTestServer

KINDS = {"plain": "bench.plain", "tracked": "bench.tracked"}


def run_round(app: Celery, task_name: str, count: int) -> tuple[float, float]:
    """Send *count* tasks and wait for their bodies; return send and total seconds."""
    counter = f"bench:throughput:{uuid.uuid4().hex}"
    task = app.tasks[task_name]
    redis = benchapp.counter_client()
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for number in range(count):
            task.apply_async((number, counter), producer=producer)
    sent = time.perf_counter()
    wait_for(lambda: int(redis.get(counter) or 0) >= count, timeout=240, interval=0.01,
             message=f"{count} {task_name} tasks to run")
    finished = time.perf_counter()
    redis.delete(counter)
    return sent - started, finished - started


def measure_broker(
    broker: str, uri: str, kinds: dict[str, str], count: int, rounds: int,
) -> dict[str, tuple[float, float]]:
    """Return the median send rate and throughput (tasks/s) of each kind on *broker*."""
    queue = unique_name("bench_tp")
    env = {"BENCH_BROKER_URL": BROKERS[broker], "BENCH_MONGODB_URI": uri,
           "BENCH_DATABASE": queue, "BENCH_QUEUE": queue}
    app = benchapp.make_app(broker_url=BROKERS[broker], mongodb_uri=uri, database=queue,
                            queue=queue)
    names = list(kinds)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    try:
        with running_worker(env=env, queue=queue):
            for name in names:
                run_round(app, kinds[name], max(count // 10, 20))
            for round_number in range(rounds):
                order = names if round_number % 2 == 0 else list(reversed(names))
                for name in order:
                    send_seconds, total_seconds = run_round(app, kinds[name], count)
                    samples[name].append((count / send_seconds, count / total_seconds))
    finally:
        delete_queues(BROKERS[broker], [queue, f"{queue}.dlq"])
    return {name: (median([rate for rate, _ in values]), median([rate for _, rate in values]))
            for name, values in samples.items()}


def print_figures(broker: str, figures: dict[str, tuple[float, float]], baseline: str,
                  count: int, rounds: int) -> None:
    base_total = figures[baseline][1]
    print(f"{broker}: {count} tasks per round, median of {rounds} rounds per kind")
    print(f"    {'kind':<18} {'sent/s':>9} {'completed/s':>12} {'ratio to ' + baseline:>18}")
    for name, (send_rate, total_rate) in figures.items():
        print(f"    {name:<18} {send_rate:>9.0f} {total_rate:>12.0f} "
              f"{total_rate / base_total:>18.2f}")


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000,
                        help="tasks sent per round (default: 1000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per kind and broker (default: 3)")
    parser.add_argument("--brokers", default="redis,rabbitmq",
                        help="comma-separated brokers among redis, rabbitmq")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    arguments = parse_arguments(argv)
    brokers = arguments.brokers.split(",")
    started = time.monotonic()
    with MongoTestServer() as server:
        print_environment(brokers=[BROKERS[name] for name in brokers], store_uri=server.uri)
        print("Worker: one process, prefork pool with 2 processes")
        print()
        for broker in brokers:
            figures = measure_broker(broker, server.uri, KINDS, arguments.tasks,
                                     arguments.rounds)
            print_figures(broker, figures, "plain", arguments.tasks, arguments.rounds)
            print()
    print(f"Finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
