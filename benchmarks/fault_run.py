"""Randomized fault run: kill pool processes and workers, restart MongoDB, count body runs.

Sends a few hundred tracked tasks to prefork workers with late acks while
a seeded schedule SIGKILLs pool processes and whole workers mid-task and
restarts the MongoDB test server. It then waits until every task has
completed and the workers are quiet, counts the body runs recorded in
MongoDB, and prints a final line ``lost=N duplicated=N completed=N``.
The exit status is 1 when a task was lost or a body completed twice.

Kills are aimed at processes whose bodies are mid-run. A process killed
after its body ended but before the outcome was written runs the body
again on redelivery: that window is not covered by the guarantees, so the
schedule never kills a worker with an outcome write still pending.

Only local servers are used: a MongoDB test server started here on a free
port of 127.0.0.1, and the Redis (database 10) or RabbitMQ broker on
127.0.0.1. Run ``python benchmarks/fault_run.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import random
import signal
import sys
import time
import types
from typing import Any

import pymongo
from pymongo.errors import PyMongoError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from celery_tasktracker import StoreUnavailableError  # noqa: E402
from tests.fault_app import BODY_RUNS  # noqa: E402
from tests.fault_harness import (  # noqa: E402
    FaultCluster,
    RestartableMongo,
    fault_cluster,
    kill_pool_child,
)
from tests.harness import WorkerProcess  # noqa: E402

BROKER_URLS = {
    "redis": os.environ.get("TASKTRACKER_FAULT_RUN_REDIS_URL", "redis://127.0.0.1:6379/10"),
    "amqp": os.environ.get("TASKTRACKER_FAULT_RUN_AMQP_URL",
                           "amqp://guest:guest@127.0.0.1:5672//"),
}

#: A body is killed only with at least this many seconds of sleep left, so
#: the kill cannot land between its end and its outcome write.
KILL_MARGIN = 0.3


class DeadlineExceeded(Exception):
    """The run went past its hard deadline."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Options of one fault run."""

    seed: int
    tasks: int
    broker: str
    workers: int
    fault_seconds: float
    deadline: float
    lease: float
    visibility_timeout: float


def parse_args(argv: list[str] | None = None) -> RunConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the task durations and fault schedule (default: random)")
    parser.add_argument("--tasks", type=int, default=300, help="tasks to send (default 300)")
    parser.add_argument("--broker", choices=sorted(BROKER_URLS), default="redis",
                        help="broker on 127.0.0.1 (default redis)")
    parser.add_argument("--workers", type=int, default=3,
                        help="worker processes, 2 pool processes each (default 3)")
    parser.add_argument("--fault-seconds", type=float, default=90.0,
                        help="seconds over which tasks are sent and faults injected "
                             "(default 90)")
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="hard limit of the whole run in seconds (default 300)")
    parser.add_argument("--lease", type=float, default=10.0,
                        help="tasktracker_lease of the workers in seconds (default 10)")
    parser.add_argument("--visibility-timeout", type=float, default=20.0,
                        help="Redis visibility timeout in seconds (default 20)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    return RunConfig(seed=seed, tasks=args.tasks, broker=args.broker, workers=args.workers,
                     fault_seconds=args.fault_seconds, deadline=args.deadline,
                     lease=args.lease, visibility_timeout=args.visibility_timeout)


@dataclasses.dataclass
class Counts:
    """Body runs per taskId key at the end of the run."""

    sent: int
    unsent: list[str]
    lost: list[str]
    duplicated: list[str]
    completed: int


class FaultRun:
    """One seeded run: the send schedule, the fault schedule and the final count."""

    def __init__(self, config: RunConfig, mongo: RestartableMongo,
                 cluster: FaultCluster) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.mongo = mongo
        self.cluster = cluster
        self.started = time.monotonic()
        self.keys = [f"run{config.seed}-{index:04d}" for index in range(config.tasks)]
        self.durations = {key: round(self.rng.uniform(0.2, 1.5), 2) for key in self.keys}
        self.unsent: collections.deque[str] = collections.deque(self.keys)
        self.sent: set[str] = set()
        self.events: collections.Counter[str] = collections.Counter()
        self.mongo_back_at: float | None = None
        self.pending_workers = 0
        self.reader: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            mongo.uri, tz_aware=True, serverSelectionTimeoutMS=1000,
            connectTimeoutMS=1000, socketTimeoutMS=3000,
        )

    # -- helpers -----------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {message}", flush=True)

    def check_deadline(self) -> None:
        if self.elapsed() > self.config.deadline:
            raise DeadlineExceeded(f"the run passed its {self.config.deadline:.0f} s deadline")

    @property
    def runs(self) -> pymongo.collection.Collection[dict[str, Any]]:
        return self.reader[self.cluster.settings.database][BODY_RUNS]

    @property
    def executions(self) -> pymongo.collection.Collection[dict[str, Any]]:
        return self.reader[self.cluster.settings.database]["task_tracker"]

    # -- sending -----------------------------------------------------------

    def send_due(self) -> None:
        """Send the tasks whose turn has come; a send that fails is tried again later."""
        due = int(self.config.tasks * min(1.0, self.elapsed() / self.config.fault_seconds))
        while self.unsent and len(self.sent) < due:
            key = self.unsent[0]
            try:
                self.cluster.send(key, seconds=self.durations[key])
            except StoreUnavailableError:
                self.events["send failed: store unavailable"] += 1
                return
            self.unsent.popleft()
            self.sent.add(key)

    # -- faults ------------------------------------------------------------

    def running_bodies(self) -> list[dict[str, Any]]:
        """Start records of bodies that are sleeping now, with time left to kill them."""
        now = time.time()
        starts = list(self.runs.find({"phase": "start", "until": {"$gt": now + KILL_MARGIN}}))
        done = {(run["celeryTaskId"], run["pid"]) for run in self.runs.find(
            {"phase": "done", "at": {"$gt": now - 60}}, {"celeryTaskId": 1, "pid": 1})}
        return [start for start in starts if (start["celeryTaskId"], start["pid"]) not in done]

    def safe_to_kill(self, worker: WorkerProcess) -> bool:
        """Return whether no pool process of *worker* is between a body's end and its outcome.

        Each pool process is idle, sleeping in a body with time left, or
        done with a body whose outcome is written.
        """
        assert worker.process is not None
        now = time.time()
        for pid in pool_children(worker.process.pid):
            start = self.runs.find_one({"pid": pid, "phase": "start"}, sort=[("at", -1)])
            if start is None or not start["hostname"].startswith(f"{worker.name}@"):
                continue
            done = self.runs.find_one({"_id": start["_id"].replace(":start", ":done")})
            if done is None:
                if start["until"] <= now + KILL_MARGIN:
                    return False
                continue
            execution = self.executions.find_one(
                {"celeryTaskId": start["celeryTaskId"], "worker.pid": pid,
                 "worker.hostname": start["hostname"]}, sort=[("createdAt", -1)])
            if execution is not None and execution["status"] == "processing":
                return False
        return True

    def kill_pool_process(self) -> None:
        live = {worker.name for worker in self.cluster.workers}
        bodies = [body for body in self.running_bodies()
                  if body["hostname"].split("@")[0] in live]
        if not bodies:
            self.events["pool kill skipped: no body mid-run"] += 1
            return
        body = self.rng.choice(bodies)
        try:
            kill_pool_child(body["pid"], self.cluster.workers)
        except (OSError, AssertionError) as exc:
            self.log(f"skipped killing pool process {body['pid']}: {exc}")
            return
        self.events["pool process killed"] += 1
        self.log(f"killed pool process {body['pid']} of {body['hostname']} "
                 f"running {body['key']}")

    def kill_whole_worker(self) -> None:
        if len(self.cluster.workers) < 2:
            self.events["worker kill skipped: one worker left"] += 1
            return
        worker = self.rng.choice(self.cluster.workers)
        if not self.safe_to_kill(worker):
            self.events["worker kill skipped: a body is ending"] += 1
            return
        self.cluster.kill_worker(worker)
        self.events["worker killed"] += 1
        self.pending_workers += 1
        self.log(f"killed worker {worker.name} with its pool")

    def restart_mongo(self, downtime: float) -> None:
        self.mongo.stop()
        self.mongo_back_at = time.monotonic() + downtime
        self.events["MongoDB restarted"] += 1
        self.log(f"stopped MongoDB for {downtime:.1f} s")

    def replace_workers(self) -> None:
        while self.pending_workers:
            self.cluster.add_worker()
            self.pending_workers -= 1
            self.log("started a replacement worker")

    def inject_fault(self) -> None:
        choice = self.rng.random()
        try:
            if choice < 0.40:
                self.kill_pool_process()
            elif choice < 0.75:
                self.kill_whole_worker()
            else:
                self.restart_mongo(self.rng.uniform(0.5, 2.0))
        except PyMongoError as exc:
            # The fault schedule reads MongoDB to aim its kills; while the
            # server is down a kill is skipped.
            self.events["fault skipped: MongoDB unreachable"] += 1
            self.log(f"skipped a fault, MongoDB unreachable: {type(exc).__name__}")

    # -- phases ------------------------------------------------------------

    def feed_and_break(self) -> None:
        """Send every task while faults are injected at random intervals."""
        next_fault = self.elapsed() + self.rng.uniform(2.0, 4.0)
        while self.unsent or self.elapsed() < self.config.fault_seconds:
            self.check_deadline()
            if self.mongo_back_at is not None and time.monotonic() >= self.mongo_back_at:
                self.mongo.start()
                self.mongo_back_at = None
                self.log("started MongoDB again")
            if self.rng.random() < 0.2:
                self.replace_workers()
            self.send_due()
            if (self.mongo_back_at is None and self.elapsed() >= next_fault
                    and self.elapsed() < self.config.fault_seconds):
                self.inject_fault()
                next_fault = self.elapsed() + self.rng.uniform(1.5, 4.0)
            time.sleep(0.05)
        if self.mongo_back_at is not None:
            self.mongo.start()
            self.mongo_back_at = None
        self.replace_workers()
        self.log(f"sent {len(self.sent)} tasks; faults: {dict(self.events)}")

    def settle(self) -> None:
        """Wait until every sent task completed and no body started for a while."""
        quiet_seconds = self.config.lease + 5.0
        last_start = 0
        quiet_since = time.monotonic()
        while True:
            self.check_deadline()
            try:
                completed = len(self.runs.distinct("key", {"phase": "done"}))
                starts = self.runs.count_documents({"phase": "start"})
                processing = self.executions.count_documents({"status": "processing"})
            except PyMongoError:
                time.sleep(0.5)
                continue
            if starts != last_start or processing:
                last_start = starts
                quiet_since = time.monotonic()
            if completed >= len(self.sent) and time.monotonic() - quiet_since > quiet_seconds:
                self.log(f"settled: {completed} tasks completed, {starts} bodies started")
                return
            time.sleep(0.5)

    def count(self) -> Counts:
        per_key = {row["_id"]: row["n"] for row in self.runs.aggregate(
            [{"$match": {"phase": "done"}}, {"$group": {"_id": "$key", "n": {"$sum": 1}}}])}
        lost = sorted(key for key in self.sent if per_key.get(key, 0) == 0)
        duplicated = sorted(key for key in self.sent if per_key.get(key, 0) > 1)
        completed = sum(1 for key in self.sent if per_key.get(key, 0) >= 1)
        return Counts(len(self.sent), list(self.unsent), lost, duplicated, completed)

    def describe(self, key: str) -> None:
        """Print the execution history and body runs of one lost or duplicated key."""
        task_id = self.cluster.task_id(key)
        self.log(f"history of {task_id}:")
        for record in self.executions.find({"taskId": task_id}, {"_id": 0}).sort("createdAt"):
            fields = ("executionId", "status", "attempt", "redelivered", "errorType",
                      "superseded", "duplicateDeliveries", "worker")
            print("   ", {field: record.get(field) for field in fields})
        for run in self.runs.find({"key": key}).sort("at"):
            print("    body", run["phase"], run["hostname"], run["pid"], run["celeryTaskId"])


def pool_children(parent: int) -> list[int]:
    """Return the pids of the processes whose parent is *parent*."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(entry))
    return children


def on_hard_deadline(signum: int, frame: types.FrameType | None) -> None:
    raise DeadlineExceeded("the run passed its hard deadline while blocked")


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    print(f"fault run: seed={config.seed} tasks={config.tasks} broker={config.broker} "
          f"workers={config.workers} lease={config.lease} s deadline={config.deadline:.0f} s",
          flush=True)
    # A blocked call cannot outlive the deadline by more than a minute.
    signal.signal(signal.SIGALRM, on_hard_deadline)
    signal.setitimer(signal.ITIMER_REAL, config.deadline + 60)
    started = time.monotonic()
    counts: Counts | None = None
    settings: dict[str, Any] = {
        "lease": config.lease, "lease_renewal_interval": max(0.5, config.lease / 10),
        "visibility_timeout": config.visibility_timeout, "mongodb_timeout": 1.0,
    }
    with RestartableMongo() as mongo, fault_cluster(
        BROKER_URLS[config.broker], mongo.uri, workers=config.workers, **settings,
    ) as cluster:
        run = FaultRun(config, mongo, cluster)
        try:
            run.feed_and_break()
            run.settle()
        except DeadlineExceeded as exc:
            run.log(f"stopped: {exc}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if not mongo.running:
                mongo.start()
        counts = run.count()
        for key in [*counts.lost, *counts.duplicated][:10]:
            run.describe(key)
        if counts.unsent:
            run.log(f"{len(counts.unsent)} tasks were never sent")
        worker_logs: list[WorkerProcess] = [*cluster.workers, *cluster.retired]
        errors = sum(log.output().count("raised unexpected") for log in worker_logs)
        run.log(f"tasks that raised unexpected errors in workers: {errors}")
        run.reader.close()

    duration = time.monotonic() - started
    print(f"seed={config.seed} duration={duration:.1f} s sent={counts.sent}", flush=True)
    print(f"lost={len(counts.lost)} duplicated={len(counts.duplicated)} "
          f"completed={counts.completed}", flush=True)
    return 1 if counts.lost or counts.duplicated or counts.unsent else 0


if __name__ == "__main__":
    sys.exit(main())
