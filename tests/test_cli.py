"""``celery tasktracker`` run as a subprocess against real workers, brokers and MongoDB."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest
from celery import Celery

from celery_tasktracker import get_tracker, operations
from celery_tasktracker.operations import DlqSelection
from celery_tasktracker.publish import build_document, register_send
from celery_tasktracker.store.base import utcnow
from celery_tasktracker.testing import free_port
from tests.harness import BROKERS, ROOT, delete_queues, running_workers, unique_name, wait_for
from tests.ops_app import make_ops_app

pytestmark = pytest.mark.worker


@dataclasses.dataclass
class Setup:
    app: Celery
    settings: dict[str, str]
    mongo: pymongo.database.Database

    @property
    def queue(self) -> str:
        return self.settings["queue"]

    def cli(self, *args: str, env: dict[str, str] | None = None,
            stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
        """Run ``celery -A tests.worker_app tasktracker ARGS`` and return the result."""
        variables = {
            **os.environ, "TT_BROKER_URL": self.settings["broker_url"],
            "TT_MONGODB_URI": self.settings["mongodb_uri"],
            "TT_DATABASE": self.settings["database"], "TT_QUEUE": self.queue,
            "PYTHONPATH": ROOT, "NO_COLOR": "1", **(env or {}),
        }
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tests.worker_app", "tasktracker", *args],
            capture_output=True, text=True, env=variables, cwd=ROOT, timeout=120, stdin=stdin,
        )

    def cli_json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def record(self, celery_task_id: str) -> dict[str, Any] | None:
        return get_tracker(self.app).store.find_by_celery_id(celery_task_id)

    def execution(self, execution_id: str) -> dict[str, Any] | None:
        return get_tracker(self.app).store.get(execution_id)

    def dead_letter(self, task_name: str = "tests.ops.fail_once", key: str | None = None
                    ) -> dict[str, Any]:
        result = self.app.tasks[task_name].delay(key or new_key())
        return wait_for(lambda: (r := self.record(result.id)) and r["status"] == "dlq" and r,
                        timeout=45, message=f"{task_name} to be dead-lettered")

    def on_dlq(self, execution_id: str) -> bool:
        report = operations.purge_dlq(
            get_tracker(self.app), DlqSelection(execution_ids=(execution_id,)), dry_run=True,
        )
        return execution_id not in report.not_found

    def runs(self, key: str) -> int:
        return self.mongo.body_runs.count_documents({"key": key})

    def lost_send(self, user: str) -> dict[str, Any]:
        """Record a notify send whose message never reached the broker, with its arguments."""
        tracker = get_tracker(self.app)
        document = build_document(
            key=self.app.tasks["tests.notify"].build_task_key((user,)),
            task_name="tests.notify", celery_task_id=str(uuid.uuid4()), queue=self.queue,
            attempt=0, now=utcnow(), dedup_window=tracker.config.dedup_window,
            # Stands in for a task that opts in to storing its arguments.
            extra={"args": [user], "kwargs": {}},
        )
        assert not register_send(tracker, document).is_duplicate
        return document


def new_key() -> str:
    return uuid.uuid4().hex[:12]


def start_settings(broker: str, mongodb_uri: str) -> dict[str, str]:
    return {"broker_url": BROKERS[broker], "mongodb_uri": mongodb_uri,
            "database": unique_name("ttc").replace("-", "_"), "queue": unique_name("ttq")}


def _workers(broker: str, mongodb_uri: str,
             mongo_client: pymongo.MongoClient) -> Iterator[Setup]:
    settings = start_settings(broker, mongodb_uri)
    with running_workers(1, extra_args=("--include", "tests.ops_worker_tasks"),
                         **settings) as workers:
        app = make_ops_app(**settings)
        yield Setup(app, settings, mongo_client[settings["database"]])
    delete_queues(settings["broker_url"], [settings["queue"], f"{settings['queue']}.dlq",
                                           workers[0].private_queue])
    mongo_client.drop_database(settings["database"])


@pytest.fixture(scope="module")
def setup(mongodb_uri: str, mongo_client: pymongo.MongoClient) -> Iterator[Setup]:
    """A Redis worker with the operations tasks, shared by the module."""
    yield from _workers("redis", mongodb_uri, mongo_client)


@pytest.fixture(scope="module")
def amqp_setup(mongodb_uri: str, mongo_client: pymongo.MongoClient) -> Iterator[Setup]:
    """A RabbitMQ worker with the operations tasks, for replay."""
    yield from _workers("amqp", mongodb_uri, mongo_client)


@pytest.fixture
def idle(mongodb_uri: str, mongo_client: pymongo.MongoClient) -> Iterator[Setup]:
    """A database and queue of this test only, with no worker consuming the queue."""
    settings = start_settings("redis", mongodb_uri)
    app = make_ops_app(**settings)
    yield Setup(app, settings, mongo_client[settings["database"]])
    delete_queues(settings["broker_url"], [settings["queue"], f"{settings['queue']}.dlq"])
    mongo_client.drop_database(settings["database"])


# -- the command group -------------------------------------------------------------


def test_help_lists_commands(idle: Setup) -> None:
    top = idle.cli("--help")
    dlq = idle.cli("dlq", "--help")

    assert top.returncode == 0, top.stderr
    for command in ("stats", "trace", "stuck", "dlq"):
        assert f"  {command} " in top.stdout
    assert dlq.returncode == 0, dlq.stderr
    for command in ("list", "show", "replay", "purge"):
        assert f"  {command} " in dlq.stdout


def test_unreachable_store_exits_without_password(idle: Setup) -> None:
    uri = f"mongodb://operator:s3cret-pw@127.0.0.1:{free_port()}/"

    result = idle.cli("stats", env={"TT_MONGODB_URI": uri})

    assert result.returncode == 69
    assert "operator:***@127.0.0.1" in result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout


# -- stats -------------------------------------------------------------------------


def test_stats_table_and_json(setup: Setup) -> None:
    record = setup.dead_letter()

    table = setup.cli("stats")
    data = setup.cli_json("stats", "--queue", setup.queue, "--since", "1h")

    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "Executions by queue (all time)"
    assert lines[1].split()[:3] == ["QUEUE", "TOTAL", "QUEUED"]
    assert any(line.startswith(setup.queue + " ") for line in lines)
    assert any(line.startswith("tests.ops.fail_once ") for line in lines)
    assert "Errors by category (all time)" in lines
    dlq_rows = [line.split() for line in lines if line.startswith(f"{setup.queue}.dlq ")]
    assert dlq_rows[0][1] == str(data["dlq"][0]["records"])
    counts = data["queues"][setup.queue]
    assert counts["statuses"]["dlq"] >= 1
    assert counts["categories"]["validation"] >= 1
    assert data["tasks"][record["taskName"]]["statuses"]["dlq"] >= 1
    assert data["dlq"][0]["queue"] == f"{setup.queue}.dlq"
    assert data["dlq"][0]["messages"] >= 1
    assert data["since"] is not None
    assert data["brokerError"] is None


@pytest.mark.parametrize(("args", "message"), [
    (("stats", "--since", "5x"),
     "Invalid value for '--since': invalid duration '5x': use a number followed by s, m, h "
     "or d, for example 30s, 15m, 2h, 7d or 1h30m"),
    (("stuck", "--older-than", "soon"), "Invalid value for '--older-than': invalid duration"),
    (("stuck", "--requeue", "--dead-letter"), "--requeue and --dead-letter exclude each other"),
    (("dlq", "list", "--limit", "0"), "Invalid value for '--limit': 0 is not in the range"),
    (("dlq", "list", "--newer-than", "2 hours"), "invalid duration '2 hours'"),
    (("dlq", "replay",), "no messages selected: pass --all, or one or more --task-id or "
                         "--execution-id values"),
    (("dlq", "purge", "--all", "--task-id", "x"),
     "--all cannot be combined with --task-id or --execution-id"),
])
def test_bad_arguments_exit_with_usage_error(idle: Setup, args: tuple[str, ...],
                                             message: str) -> None:
    result = idle.cli(*args)

    assert result.returncode == 2
    assert message in " ".join(result.stderr.split())
    assert result.stdout == ""


# -- trace -------------------------------------------------------------------------


def test_trace_prints_one_line_per_execution(setup: Setup) -> None:
    key = new_key()
    record = setup.dead_letter(key=key)
    report = operations.replay_dlq(get_tracker(setup.app),
                                   DlqSelection(execution_ids=(record["executionId"],)))
    new_execution_id = str(report.outcomes[0].new_execution_id)
    wait_for(lambda: setup.execution(new_execution_id)["status"] == "completed",
             message="the replay to complete")
    new = setup.execution(new_execution_id)

    result = setup.cli("trace", record["celeryTaskId"])

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (f"taskId {record['taskId']} (found by celeryTaskId "
                        f"{record['celeryTaskId']}): 2 execution(s)")
    assert lines[1].split()[:4] == ["ATTEMPT", "STATUS", "WORKER", "STARTED"]
    first, second = lines[2].split(), lines[3].split()
    assert first[:2] == ["0", "archived"]
    assert record["celeryTaskId"] in first
    assert record["executionId"] in first
    assert "validation" in first
    assert "ValueError:" in first
    assert second[:2] == ["0", "completed"]
    assert new["celeryTaskId"] in second
    assert f"replay of {record['executionId']}" in lines[3]


def test_trace_json_lists_records(setup: Setup) -> None:
    record = setup.dead_letter()

    data = setup.cli_json("trace", record["taskId"])

    assert data["taskId"] == record["taskId"]
    assert data["matched"] == "taskId"
    assert [e["executionId"] for e in data["executions"]] == [record["executionId"]]
    assert data["executions"][0]["celeryTaskId"] == record["celeryTaskId"]
    assert data["executions"][0]["createdAt"].endswith("+00:00")


def test_trace_unknown_key_exits_nonzero(idle: Setup) -> None:
    result = idle.cli("trace", "partner_tasks:NOPE:1")

    assert result.returncode == 1
    assert "no execution found for 'partner_tasks:NOPE:1'" in result.stderr


# -- stuck -------------------------------------------------------------------------


def test_stuck_reports_table_and_json(idle: Setup) -> None:
    document = idle.lost_send(new_key())

    table = idle.cli("stuck", "--older-than", "0s")
    data = idle.cli_json("stuck", "--older-than", "0s")
    none_yet = idle.cli("stuck", "--older-than", "1h")

    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["REASON", "STATUS", "TASK", "NAME"]
    row = lines[1].split()
    assert row[:3] == ["queued_too_long", "queued", "tests.notify"]
    assert document["celeryTaskId"] in row
    assert document["executionId"] in row
    assert [(d["reason"], d["executionId"]) for d in data] == [
        ("queued_too_long", document["executionId"])]
    assert none_yet.stdout.startswith("No stuck executions")


def test_stuck_action_refused_without_terminal(idle: Setup) -> None:
    document = idle.lost_send(new_key())

    result = idle.cli("stuck", "--older-than", "0s", "--requeue")

    assert result.returncode == 2
    assert "standard input is not a terminal; pass --force" in result.stderr
    assert idle.execution(document["executionId"])["status"] == "queued"


def test_stuck_requeue_sends_again(idle: Setup) -> None:
    document = idle.lost_send(new_key())

    data = idle.cli_json("stuck", "--older-than", "0s", "--requeue", "--force")

    assert [d["action"] for d in data] == ["requeued"]
    assert data[0]["celeryTaskId"] == document["celeryTaskId"]
    new = idle.execution(data[0]["newExecutionId"])
    assert new["status"] == "queued"
    assert new["requeueOf"] == document["executionId"]
    assert new["celeryTaskId"] == data[0]["newCeleryTaskId"]
    assert idle.execution(document["executionId"])["status"] == "failed"


def test_stuck_dead_letter_table(idle: Setup) -> None:
    document = idle.lost_send(new_key())

    result = idle.cli("stuck", "--older-than", "0s", "--dead-letter", "--force")

    assert result.returncode == 0, result.stderr
    outcome = [line.split() for line in result.stdout.splitlines()
               if line.startswith("dead_lettered ")]
    assert outcome[0][1:4] == [document["taskId"], document["celeryTaskId"],
                               document["executionId"]]
    assert result.stdout.rstrip().endswith(f"published to {idle.queue}.dlq")
    assert idle.on_dlq(document["executionId"])


# -- dlq list and show -----------------------------------------------------------------


def test_dlq_list_table_and_json(setup: Setup) -> None:
    record = setup.dead_letter()

    table = setup.cli("dlq", "list", "--task-id", record["taskId"])
    data = setup.cli_json("dlq", "list", "--task-name", "tests.ops.fail_once",
                          "--category", "validation", "--newer-than", "1h")
    old = setup.cli_json("dlq", "list", "--older-than", "1d")

    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["DEAD-LETTERED", "(UTC)", "TASK"]
    row = lines[1].split()
    assert row[2:6] == [record["taskName"], record["taskId"], "1", "validation"]
    assert row[-2:] == [record["celeryTaskId"], record["executionId"]]
    assert lines[2] == "1 of 1 dead-lettered execution(s)"
    assert record["executionId"] in {r["executionId"] for r in data["records"]}
    assert data["total"] == len(data["records"])
    assert old == {"total": 0, "records": []}


def test_dlq_show_prints_traceback(setup: Setup) -> None:
    record = setup.dead_letter()

    table = setup.cli("dlq", "show", record["executionId"])
    data = setup.cli_json("dlq", "show", record["celeryTaskId"])

    assert table.returncode == 0, table.stderr
    fields = dict(line.split(":", 1) for line in table.stdout.splitlines()[:17])
    assert fields["Celery task ID"].strip() == record["celeryTaskId"]
    assert fields["Reason"].strip() == "not_retryable"
    assert fields["Error type"].strip() == "builtins.ValueError"
    assert "Traceback (most recent call last):" in table.stdout
    assert table.stdout.rstrip().endswith("missing partner code")
    assert data["executionId"] == record["executionId"]
    assert "raise ValueError" in data["traceback"]


def test_dlq_show_unknown_key_exits_nonzero(idle: Setup) -> None:
    result = idle.cli("dlq", "show", "3b4c")

    assert result.returncode == 1
    assert "no dead-lettered execution found for '3b4c'" in result.stderr


# -- dlq replay and purge ------------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_dlq_replay_brings_task_back(request: pytest.FixtureRequest, broker: str) -> None:
    target: Setup = request.getfixturevalue("setup" if broker == "redis" else "amqp_setup")
    key = new_key()
    record = target.dead_letter(key=key)

    result = target.cli("dlq", "replay", "--execution-id", record["executionId"])

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["ACTION", "TASK", "NAME"]
    row = lines[1].split()
    assert row[:5] == ["replayed", "tests.ops.fail_once", record["taskId"],
                       record["celeryTaskId"], record["executionId"]]
    assert row[-2:] == ["to", target.queue]
    assert lines[2].startswith("replayed 1 (read ")
    new_execution_id = row[6]
    new = wait_for(lambda: (r := target.execution(new_execution_id))
                   and r["status"] == "completed" and r, message="the replay to complete")
    assert new["celeryTaskId"] == row[5]
    assert new["replayOf"] == record["executionId"]
    assert target.execution(record["executionId"])["status"] == "archived"
    assert not target.on_dlq(record["executionId"])
    assert target.runs(key) == 2


def test_dlq_replay_json_and_dry_run(setup: Setup) -> None:
    record = setup.dead_letter()

    dry = setup.cli_json("dlq", "replay", "--task-id", record["taskId"], "--dry-run")
    still_there = setup.on_dlq(record["executionId"])
    done = setup.cli_json("dlq", "replay", "--task-id", record["taskId"])

    assert [o["action"] for o in dry["outcomes"]] == ["would_replay"]
    assert still_there
    assert [o["action"] for o in done["outcomes"]] == ["replayed"]
    assert done["outcomes"][0]["celeryTaskId"] == record["celeryTaskId"]
    assert done["notFound"] == []


def test_dlq_replay_unknown_id_exits_nonzero(setup: Setup) -> None:
    result = setup.cli("dlq", "replay", "--execution-id", "0000-missing")

    assert result.returncode == 1
    assert "not found on the DLQs: 0000-missing" in result.stderr


def test_dlq_replay_of_many_shows_progress(setup: Setup) -> None:
    records = [setup.dead_letter("tests.ops.always_invalid") for _ in range(12)]
    args = [arg for r in records for arg in ("--execution-id", r["executionId"])]

    result = setup.cli("dlq", "replay", *args, "--dry-run")

    assert result.returncode == 0, result.stderr
    assert "Checking DLQ messages" in result.stderr
    assert result.stdout.splitlines()[-1].startswith("would_replay 12 ")


def test_dlq_purge_refused_without_terminal(setup: Setup) -> None:
    record = setup.dead_letter()

    result = setup.cli("dlq", "purge", "--execution-id", record["executionId"])

    assert result.returncode == 2
    assert "standard input is not a terminal; pass --force" in result.stderr
    assert setup.execution(record["executionId"])["status"] == "dlq"
    assert setup.on_dlq(record["executionId"])


def test_dlq_purge_answered_no_keeps_message(setup: Setup) -> None:
    record = setup.dead_letter()
    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"n\n")
        result = setup.cli("dlq", "purge", "--execution-id", record["executionId"],
                           stdin=terminal)
    finally:
        os.close(controller)
        os.close(terminal)

    assert result.returncode == 1
    assert "There is no undo." in result.stdout
    assert "Aborted" in result.stderr
    assert setup.on_dlq(record["executionId"])


def test_dlq_purge_force_archives_record(setup: Setup) -> None:
    record = setup.dead_letter()

    result = setup.cli("dlq", "purge", "--execution-id", record["executionId"], "--force")

    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[1].split()
    assert row[:5] == ["purged", "tests.ops.fail_once", record["taskId"],
                       record["celeryTaskId"], record["executionId"]]
    assert setup.execution(record["executionId"])["archiveReason"] == "purged"
    assert not setup.on_dlq(record["executionId"])
