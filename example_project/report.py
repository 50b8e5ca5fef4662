"""The demo's checks and report, computed from the tracker records and business collections."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["DemoReport", "build_report", "latest_executions", "render_report"]

Document = dict[str, Any]

#: Statuses that end a logical task: its body will not run again.
SETTLED_STATUSES = ("completed", "dlq")


@dataclasses.dataclass
class DemoReport:
    """Counts, retry chains and problems of one demo run."""

    #: Sends of tracked tasks: executions created by a send plus deduplicated sends.
    sent: int
    #: Sends absorbed by an active execution of the same taskId.
    deduplicated: int
    #: Distinct taskIds, i.e. logical tasks.
    task_ids: int
    #: Executions whose body started, retries included.
    executed: int
    #: Logical tasks whose last execution completed.
    completed: int
    #: Executions created by a retry.
    retried: int
    #: Logical tasks that needed at least one retry.
    retried_task_ids: int
    #: Dead-lettered logical tasks per DLQ reason.
    dead_lettered: dict[str, int]
    #: Deliveries that the claim skipped because their execution was not claimable.
    duplicate_deliveries: int
    #: Messages waiting in the dead-letter queue on the broker.
    dlq_messages: int
    dlq_name: str
    flight_logs: int
    max_sync_count: int
    #: ``(taskId, history)`` of a task that retried and completed, if any.
    retried_chain: tuple[str, list[Document]] | None
    #: ``(taskId, history)`` of a dead-lettered task, if any.
    dead_letter_chain: tuple[str, list[Document]] | None
    #: Descriptions of the failed checks, empty when every check passed.
    problems: list[str]

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.problems


def latest_executions(records: Iterable[Document]) -> dict[str, Document]:
    """Return the last execution of every taskId: highest attempt, then newest."""
    latest: dict[str, Document] = {}
    for record in records:
        current = latest.get(record["taskId"])
        if current is None or _order(record) > _order(current):
            latest[record["taskId"]] = record
    return latest


def _order(record: Mapping[str, Any]) -> tuple[int, Any]:
    return int(record.get("attempt") or 0), record.get("createdAt")


def build_report(
    *,
    records: list[Document],
    flight_logs: list[Document],
    api_requests: list[Document],
    expected_task_ids: Iterable[str],
    dlq_messages: int,
    dlq_name: str,
    history: Callable[[str], list[Document]],
) -> DemoReport:
    """Count the run's outcome and check that no body ran twice and no task was lost."""
    latest = latest_executions(records)
    started = [record for record in records if record.get("startedAt") is not None]
    retries = [record for record in records if record.get("retryOf")]
    dead_lettered = collections.Counter(
        str(record.get("dlqReason")) for record in latest.values() if record["status"] == "dlq"
    )

    problems = [
        *_unaccounted_tasks(latest, expected_task_ids),
        *_repeated_attempts(started),
        *_repeated_requests(api_requests),
        *_repeated_syncs(flight_logs),
    ]
    if dlq_messages < sum(dead_lettered.values()):
        problems.append(
            f"dead-lettered logical tasks: {sum(dead_lettered.values())}, but {dlq_name} "
            f"holds only {dlq_messages} messages"
        )

    return DemoReport(
        sent=sum(1 for record in records if not record.get("retryOf"))
        + sum(int(record.get("deduplicatedSends") or 0) for record in records),
        deduplicated=sum(int(record.get("deduplicatedSends") or 0) for record in records),
        task_ids=len(latest),
        executed=len(started),
        completed=sum(1 for record in latest.values() if record["status"] == "completed"),
        retried=len(retries),
        retried_task_ids=len({record["taskId"] for record in retries}),
        dead_lettered=dict(sorted(dead_lettered.items())),
        duplicate_deliveries=sum(int(record.get("duplicateDeliveries") or 0)
                                 for record in records),
        dlq_messages=dlq_messages,
        dlq_name=dlq_name,
        flight_logs=len(flight_logs),
        max_sync_count=max((int(log.get("syncCount") or 0) for log in flight_logs), default=0),
        retried_chain=_pick_retried_chain(latest, history),
        dead_letter_chain=_pick_dead_letter_chain(latest, history),
        problems=problems,
    )


def _unaccounted_tasks(latest: Mapping[str, Document], expected: Iterable[str]) -> list[str]:
    problems = []
    for task_id in sorted(expected):
        record = latest.get(task_id)
        if record is None:
            problems.append(f"taskId {task_id} was sent but has no execution record")
        elif record["status"] not in SETTLED_STATUSES:
            problems.append(
                f"taskId {task_id} ended as {record['status']!r} at attempt "
                f"{record.get('attempt')}: neither completed nor dead-lettered"
            )
    return problems


def _repeated_attempts(started: Iterable[Document]) -> list[str]:
    # A retry chain runs attempts 0, 1, 2 ... once each. Two started
    # executions with one attempt number mean the body ran twice.
    runs = collections.Counter((record["taskId"], record.get("attempt")) for record in started)
    return [
        f"taskId {task_id} started attempt {attempt} {count} times"
        for (task_id, attempt), count in sorted(runs.items()) if count > 1
    ]


def _repeated_requests(api_requests: Iterable[Document]) -> list[str]:
    requests = collections.Counter(
        (request["partner"], request["aircraftId"], request["logId"], request["attempt"])
        for request in api_requests
    )
    return [
        f"the partner API served attempt {attempt} of flight log {partner}:{aircraft}:{log} "
        f"{count} times"
        for (partner, aircraft, log, attempt), count in sorted(requests.items()) if count > 1
    ]


def _repeated_syncs(flight_logs: Iterable[Document]) -> list[str]:
    return [
        f"flight log {log['_id']} was stored {log['syncCount']} times (syncCount > 1)"
        for log in flight_logs if int(log.get("syncCount") or 0) > 1
    ]


def _pick_retried_chain(
    latest: Mapping[str, Document], history: Callable[[str], list[Document]],
) -> tuple[str, list[Document]] | None:
    candidates = [record for record in latest.values()
                  if record["status"] == "completed" and int(record.get("attempt") or 0) > 0]
    if not candidates:
        return None
    chosen = max(candidates, key=lambda record: (record["attempt"], record["taskId"]))
    return chosen["taskId"], history(chosen["taskId"])


def _pick_dead_letter_chain(
    latest: Mapping[str, Document], history: Callable[[str], list[Document]],
) -> tuple[str, list[Document]] | None:
    candidates = [record for record in latest.values() if record["status"] == "dlq"]
    if not candidates:
        return None
    # Prefer a chain that retried before it was dead-lettered.
    chosen = max(candidates, key=lambda record: (int(record.get("attempt") or 0),
                                                 record["taskId"]))
    return chosen["taskId"], history(chosen["taskId"])


def render_report(report: DemoReport) -> str:
    """Return the report as text for the terminal."""
    dead_lettered = sum(report.dead_lettered.values())
    reasons = ", ".join(f"{reason} {count}" for reason, count in report.dead_lettered.items())
    lines = [
        "Partner sync report",
        f"  sent                  {report.sent:4d}  tracked sends of poll and sync tasks",
        f"  deduplicated          {report.deduplicated:4d}  sends absorbed by an active "
        "execution",
        f"  logical tasks         {report.task_ids:4d}  distinct taskIds",
        f"  executed              {report.executed:4d}  executions whose body ran, "
        "retries included",
        f"  completed             {report.completed:4d}  logical tasks",
        f"  retried               {report.retried:4d}  retry executions, in "
        f"{report.retried_task_ids} logical tasks",
        f"  dead-lettered         {dead_lettered:4d}  logical tasks ({reasons or 'none'})",
        f"  duplicate deliveries  {report.duplicate_deliveries:4d}  skipped at claim",
        f"  DLQ messages          {report.dlq_messages:4d}  waiting in {report.dlq_name}",
        f"  flight_logs           {report.flight_logs:4d}  documents, highest syncCount "
        f"{report.max_sync_count}",
    ]
    if report.retried_chain is not None:
        lines += ["", *_render_chain("Retry chain of a retried task", *report.retried_chain)]
    if report.dead_letter_chain is not None:
        lines += ["", *_render_chain("Retry chain of a dead-lettered task",
                                     *report.dead_letter_chain)]
    lines.append("")
    if report.ok:
        lines.append("OK: no attempt of any taskId ran twice, and every sent task completed "
                     "or is in the DLQ.")
    else:
        lines.append(f"FAILED: {len(report.problems)} problem(s):")
        lines += [f"  - {problem}" for problem in report.problems]
    return "\n".join(lines)


def _render_chain(title: str, task_id: str, chain: list[Document]) -> list[str]:
    lines = [f"{title}: {task_id}",
             "  attempt  status     category    DLQ reason         executionId"]
    for record in chain:
        lines.append(
            f"  {record.get('attempt', '?')!s:<7}  {record.get('status', '?'):<9}  "
            f"{record.get('errorCategory') or '-':<10}  {record.get('dlqReason') or '-':<17}  "
            f"{record.get('executionId')}"
        )
    return lines
