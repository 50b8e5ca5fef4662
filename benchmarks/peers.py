"""Run the throughput workload with celery-once and celery-singleton beside the tracker.

Run it as ``python benchmarks/peers.py [--tasks N] [--rounds R]``. The
workload, worker and method are those of ``throughput.py`` on Redis: one
app, one queue, one prefork worker with two pool processes, and four tasks
with the same body, sent in alternating rounds. Each figure is a ratio to
the plain Celery task measured in the same run. A peer whose package is not
installed (``pip install -e '.[bench]'``) is reported and skipped.

The three do not guarantee the same things, so the ratios price different
promises; see GUARANTEES below and docs/benchmarks.rst.
"""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Sequence

import benchapp
from benchlib import BROKERS, print_environment
from throughput import measure_broker, parse_arguments, print_figures

from celery_tasktracker.testing import MongoTestServer

GUARANTEES = {
    "plain": "Celery alone: no deduplication, no record of executions.",
    "celery-once": (
        "a Redis lock per task name and arguments, taken at send (SET NX with a "
        "timeout, one hour by default) and deleted after the task returns; a second "
        "send while it is held raises AlreadyQueued. Nothing guards execution: a "
        "redelivered or republished message runs again, and no record is kept."),
    "celery-singleton": (
        "a Redis lock per task name and arguments holding the celery task id, taken "
        "at send and deleted on success or failure; a second send returns the "
        "first one's AsyncResult. Nothing guards execution, and no record is kept."),
    "tracked": (
        "a MongoDB record per execution: dedup at send through a unique index, an "
        "atomic claim before the body runs (duplicate deliveries are skipped), "
        "outcome, retry chain and dead-letter queue, kept after the task ends."),
}

PEER_TASKS = {"celery-once": "bench.once", "celery-singleton": "bench.singleton"}


def main(argv: Sequence[str]) -> int:
    arguments = parse_arguments(argv)
    available = benchapp.peers_available()
    kinds = {"plain": "bench.plain"}
    for peer, task_name in PEER_TASKS.items():
        if available[peer]:
            kinds[peer] = task_name
    kinds["tracked"] = "bench.tracked"

    started = time.monotonic()
    with MongoTestServer() as server:
        print_environment(brokers=[BROKERS["redis"]], store_uri=server.uri,
                          extra=("celery-once", "celery-singleton"))
        for peer, installed in available.items():
            if not installed:
                print(f"{peer} is not installed: skipped (pip install -e '.[bench]')")
        print("Worker: one process, prefork pool with 2 processes")
        print()
        figures = measure_broker("redis", server.uri, kinds, arguments.tasks,
                                 arguments.rounds)
    print_figures("redis", figures, "plain", arguments.tasks, arguments.rounds)
    print()
    print("What each guarantees")
    for name in kinds:
        print(textwrap.fill(f"{name}: {GUARANTEES[name]}", width=88, initial_indent="    ",
                            subsequent_indent="        "))
    print()
    print(f"Finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
