"""The ``celery tasktracker`` command: stats, traces, stuck executions and the DLQ."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import click
from celery.bin.base import CeleryCommand, CeleryOption, handle_preload_options
from celery.exceptions import CeleryCommandException, ImproperlyConfigured
from celery.platforms import EX_UNAVAILABLE
from kombu.exceptions import OperationalError

from . import operations
from .exceptions import StoreUnavailableError, TaskTrackerError
from .extension import TaskTracker, get_tracker
from .store.base import STATUSES

__all__ = ["tasktracker"]

F = TypeVar("F", bound=Callable[..., Any])

#: Replays and purges that read at least this many messages show a progress bar.
PROGRESS_MIN_MESSAGES = 10

#: Maximum length of the error text in a table cell; ``--json`` and ``dlq show``
#: print it whole.
_ERROR_WIDTH = 60


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic since click 8.2
    """A duration such as ``30s``, ``15m``, ``2h`` or ``7d``."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None,
    ) -> dt.timedelta:
        if isinstance(value, dt.timedelta):
            return value
        try:
            return operations.parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


# -- shared pieces -----------------------------------------------------------


def _preload_options(command: F) -> F:
    """Deliver Celery's preload options to ``user_preload_options`` receivers."""
    return cast(F, handle_preload_options(command))


def _json_option(command: F) -> F:
    return click.option(
        "--json", "as_json", cls=CeleryOption, is_flag=True, help_group="Output Options",
        help="Print JSON instead of a table, for scripts.",
    )(command)


def _tracker(ctx: click.Context) -> TaskTracker:
    """Return the tracker of the app given with ``-A``, with its settings validated."""
    try:
        tracker = get_tracker(ctx.obj.app)
        tracker.config  # noqa: B018 - validates the settings now
    except TaskTrackerError as exc:
        raise click.UsageError(
            f"{exc}; pass the app that installs it with -A, e.g. celery -A proj tasktracker"
        ) from exc
    except ImproperlyConfigured as exc:
        raise click.ClickException(f"invalid tasktracker settings: {exc}") from exc
    return tracker


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Turn the errors of an operation into a message and a non-zero exit code."""
    try:
        yield
    except (StoreUnavailableError, operations.BrokerUnavailableError) as exc:
        raise CeleryCommandException(message=str(exc), exit_code=EX_UNAVAILABLE) from exc
    except OperationalError as exc:
        # kombu raises it when a publish fails after its retries.
        raise CeleryCommandException(
            message=f"could not publish to the broker: {exc}; check that it is running",
            exit_code=EX_UNAVAILABLE,
        ) from exc
    except TaskTrackerError as exc:
        raise click.ClickException(str(exc)) from exc


def _echo_json(ctx: click.Context, data: Any) -> None:
    ctx.obj.echo(json.dumps(data, indent=2, default=_json_value))


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


def _echo_table(
    ctx: click.Context, headers: Sequence[str], rows: Sequence[Sequence[Any]],
    *, numeric: Sequence[str] = (),
) -> None:
    """Print *rows* under *headers*, each column as wide as its widest cell."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells])
              for i, header in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [value.rjust(width) if header in numeric else value.ljust(width)
                  for value, width, header in zip(values, widths, headers, strict=True)]
        return "  ".join(padded).rstrip()

    ctx.obj.echo(line(headers))
    for row in cells:
        ctx.obj.echo(line(row))


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, dt.datetime):
        return _time(value)
    return str(value)


def _time(value: Any) -> str:
    if not isinstance(value, dt.datetime):
        return "-"
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _duration(value: dt.timedelta) -> str:
    """Format *value* in the largest whole unit of ``--older-than``, e.g. ``15m``."""
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:g}s"


def _runtime(milliseconds: Any) -> str:
    if not isinstance(milliseconds, int | float):
        return "-"
    if milliseconds < 1000:
        return f"{milliseconds:.0f} ms"
    return f"{milliseconds / 1000:.1f} s"


def _error(record: Mapping[str, Any], width: int = _ERROR_WIDTH) -> str:
    error_type = str(record.get("errorType") or "").rsplit(".", 1)[-1]
    message = " ".join(str(record.get("errorMessage") or "").split())
    text = f"{error_type}: {message}" if error_type and message else error_type or message
    return text if len(text) <= width else text[: width - 3] + "..."


def _worker(record: Mapping[str, Any]) -> str:
    worker = record.get("worker")
    return str(worker.get("hostname") or "-") if isinstance(worker, Mapping) else "-"


def _require_confirmation(force: bool, question: str) -> None:
    """Ask *question* unless *force*, and fail when standard input is not a terminal."""
    if force:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(
            "refusing to continue without confirmation because standard input is not a "
            "terminal; pass --force to run without asking"
        )
    click.confirm(f"{question} (to skip this question pass --force)", abort=True)


# -- the command group ---------------------------------------------------------


@click.group(name="tasktracker")
@click.pass_context
def tasktracker(ctx: click.Context, /, **kwargs: Any) -> None:
    """Inspect executions recorded by celery_tasktracker and operate its DLQs.

    Every command reads the MongoDB store of the app given with -A; the dlq
    commands and the message counts of stats also use its broker.
    """


@tasktracker.command(cls=CeleryCommand)
@click.option("-Q", "--queue", cls=CeleryOption, help_group="Stats Options",
              help="Count only the executions of this queue.")
@click.option("--since", cls=CeleryOption, type=DURATION, help_group="Stats Options",
              help="Count only executions created within this duration, e.g. 1h or 7d.")
@_json_option
@click.pass_context
@_preload_options
def stats(
    ctx: click.Context, /, queue: str | None, since: dt.timedelta | None, as_json: bool,
    **kwargs: Any,
) -> None:
    """Count executions by status and error category, and the DLQ depths.

    Counts are per queue and per task name; the DLQ table gives the records
    with status dlq and the messages on each DLQ now.
    """
    tracker = _tracker(ctx)
    with _reported_errors():
        result = operations.stats(tracker, queue=queue, since=since)
    if as_json:
        _echo_json(ctx, result.as_dict())
        return
    _print_stats(ctx, result)


def _print_stats(ctx: click.Context, result: operations.Stats) -> None:
    scope = f"created since {_time(result.since)} UTC" if result.since else "all time"
    if not result.by_queue:
        ctx.obj.echo(f"No executions recorded ({scope}).")
    statuses = list(STATUSES)
    extra = sorted({s for c in result.by_queue.values() for s in c.statuses} - set(statuses))
    statuses += extra
    # Observe mode's counters show only where observe mode counted something.
    observed = any(c.would_deduplicate_sends or c.would_skip_deliveries
                   for c in result.by_queue.values())
    count_headers = ["TOTAL", *(s.upper() for s in statuses), "DEDUPLICATED",
                     "DUPLICATE DELIVERIES"]
    if observed:
        count_headers += ["WOULD DEDUPLICATE", "WOULD SKIP"]

    for title, column, table in (("queue", "QUEUE", result.by_queue),
                                 ("task", "TASK NAME", result.by_task)):
        if not table:
            continue
        ctx.obj.echo(f"Executions by {title} ({scope})")
        rows = []
        for name, counts in table.items():
            row = [name, counts.total, *(counts.statuses.get(s, 0) for s in statuses),
                   counts.deduplicated_sends, counts.duplicate_deliveries]
            if observed:
                row += [counts.would_deduplicate_sends, counts.would_skip_deliveries]
            rows.append(row)
        _echo_table(ctx, [column, *count_headers], rows, numeric=count_headers)
        ctx.obj.echo("")

    categories = sorted({c for counts in result.by_queue.values() for c in counts.categories})
    if categories:
        ctx.obj.echo(f"Errors by category ({scope})")
        rows = [[kind, name, *(counts.categories.get(c, 0) for c in categories)]
                for kind, table in (("queue", result.by_queue), ("task", result.by_task))
                for name, counts in table.items() if counts.categories]
        headers = [c.upper() for c in categories]
        _echo_table(ctx, ["BY", "NAME", *headers], rows, numeric=headers)
        ctx.obj.echo("")

    if result.dlq:
        ctx.obj.echo("Dead-letter queues (records with status dlq, messages on the broker now)")
        rows = [[d.queue, d.records, "?" if d.messages is None else d.messages]
                for d in result.dlq]
        _echo_table(ctx, ["DLQ", "RECORDS", "MESSAGES"], rows, numeric=["RECORDS", "MESSAGES"])
    if result.broker_error:
        ctx.obj.secho(f"Message counts unavailable: {result.broker_error}", fg="yellow")


@tasktracker.command(cls=CeleryCommand)
@click.argument("key")
@_json_option
@click.pass_context
@_preload_options
def trace(ctx: click.Context, /, key: str, as_json: bool, **kwargs: Any) -> None:
    """Show the retry chain of a taskId, one line per execution.

    KEY is a taskId, or an executionId or celery task id of one of its
    executions.
    """
    tracker = _tracker(ctx)
    with _reported_errors():
        result = operations.trace(tracker, key)
    if as_json:
        _echo_json(ctx, result.as_dict())
        return
    matched = "" if result.matched == "taskId" else f" (found by {result.matched} {key})"
    ctx.obj.echo(f"taskId {result.task_id}{matched}: {len(result.executions)} execution(s)")
    rows = [[record.get("attempt"), record.get("status"), _worker(record),
             record.get("startedAt"), _runtime(record.get("runtimeMs")),
             record.get("errorCategory"), _error(record), record.get("celeryTaskId"),
             record.get("executionId"), _links(record)]
            for record in result.executions]
    _echo_table(ctx, ["ATTEMPT", "STATUS", "WORKER", "STARTED (UTC)", "RUNTIME", "CATEGORY",
                      "ERROR", "CELERY TASK ID", "EXECUTION ID", "NOTE"], rows,
                numeric=["ATTEMPT", "RUNTIME"])


def _links(record: Mapping[str, Any]) -> str:
    notes = []
    if record.get("retryOf"):
        notes.append("retry")
    if record.get("replayOf"):
        notes.append(f"replay of {record['replayOf']}")
    if record.get("requeueOf"):
        notes.append(f"requeue of {record['requeueOf']}")
    if record.get("redeliveryOf"):
        notes.append(f"redelivery of {record['redeliveryOf']}")
    elif record.get("redelivered"):
        notes.append("redelivered")
    if record.get("dlqQueue") and record.get("status") in ("dlq", "archived"):
        notes.append(f"dead-lettered to {record['dlqQueue']}")
    return "; ".join(notes)


@tasktracker.command(cls=CeleryCommand)
@click.option("--older-than", cls=CeleryOption, type=DURATION, default="15m",
              show_default=True, help_group="Stuck Options",
              help="Report queued executions created and due longer ago than this.")
@click.option("--requeue", cls=CeleryOption, is_flag=True, help_group="Stuck Options",
              help="Send each stuck execution again as a new execution of its taskId.")
@click.option("--dead-letter", cls=CeleryOption, is_flag=True, help_group="Stuck Options",
              help="Mark each stuck execution dlq and publish it to its DLQ.")
@click.option("--limit", cls=CeleryOption, type=click.IntRange(min=1), default=1000,
              show_default=True, help_group="Stuck Options",
              help="Report or act on at most this many executions.")
@click.option("-f", "--force", cls=CeleryOption, is_flag=True, help_group="Stuck Options",
              help="Do not ask before --requeue or --dead-letter.")
@_json_option
@click.pass_context
@_preload_options
def stuck(
    ctx: click.Context, /, older_than: dt.timedelta, requeue: bool, dead_letter: bool,
    limit: int, force: bool, as_json: bool, **kwargs: Any,
) -> None:
    """Find executions that no worker will finish without help.

    These are executions whose lease lapsed, that sat queued too long, whose
    DLQ publish failed, or whose earlier --requeue or --dead-letter was
    interrupted. Without an action the command only reports them. --requeue
    and --dead-letter need the task's arguments stored on the record, and
    exit with status 1 when they skip an execution.
    """
    if requeue and dead_letter:
        raise click.UsageError("--requeue and --dead-letter exclude each other; pick one")
    tracker = _tracker(ctx)
    with _reported_errors():
        found = operations.find_stuck(tracker, older_than, limit=limit)
    if not requeue and not dead_letter:
        if as_json:
            _echo_json(ctx, [item.as_dict() for item in found])
        else:
            _print_stuck(ctx, found, older_than)
        return

    if found:
        action = "Requeue" if requeue else "Dead-letter"
        _require_confirmation(force, f"{action} {len(found)} stuck execution(s)?")
    act = operations.requeue_stuck if requeue else operations.dead_letter_stuck
    with _reported_errors():
        outcomes = act(tracker, found)
    if as_json:
        _echo_json(ctx, [outcome.as_dict() for outcome in outcomes])
    else:
        _print_stuck(ctx, found, older_than)
        _print_stuck_outcomes(ctx, outcomes)
    _fail_on_skipped(sum(outcome.action == "skipped" for outcome in outcomes), [])


def _print_stuck_outcomes(ctx: click.Context, outcomes: Sequence[operations.StuckOutcome]) -> None:
    if not outcomes:
        return
    ctx.obj.echo("")
    rows = [[o.action, o.task_id, o.celery_task_id, o.execution_id, o.new_celery_task_id,
             o.new_execution_id, o.detail] for o in outcomes]
    _echo_table(ctx, ["ACTION", "TASK ID", "CELERY TASK ID", "EXECUTION ID",
                      "NEW CELERY TASK ID", "NEW EXECUTION ID", "DETAIL"], rows)


def _print_stuck(
    ctx: click.Context, found: Sequence[operations.StuckExecution], older_than: dt.timedelta,
) -> None:
    if not found:
        ctx.obj.echo("No stuck executions (lease lapsed, or queued longer than "
                     f"{_duration(older_than)}).")
        return
    rows = []
    for item in found:
        record = item.record
        since = {operations.LEASE_EXPIRED: record.get("leaseExpiresAt"),
                 operations.QUEUED_TOO_LONG: record.get("createdAt")}.get(
            item.reason, record.get("updatedAt"))
        rows.append([item.reason, record.get("status"), record.get("taskName"),
                     record.get("taskId"), record.get("attempt"), _worker(record), since,
                     record.get("celeryTaskId"), record.get("executionId")])
    _echo_table(ctx, ["REASON", "STATUS", "TASK NAME", "TASK ID", "ATTEMPT", "WORKER",
                      "SINCE (UTC)", "CELERY TASK ID", "EXECUTION ID"], rows,
                numeric=["ATTEMPT"])


# -- dlq -------------------------------------------------------------------------


@tasktracker.group()
def dlq() -> None:
    """List, show, replay and purge dead-lettered tasks."""


@dlq.command(name="list", cls=CeleryCommand)
@click.option("--task-name", cls=CeleryOption, help_group="Filter Options",
              help="Only this task, e.g. proj.tasks.sync.")
@click.option("--task-id", cls=CeleryOption, help_group="Filter Options",
              help="Only executions of this taskId.")
@click.option("--category", cls=CeleryOption, help_group="Filter Options",
              help="Only this error category, e.g. validation.")
@click.option("-Q", "--queue", cls=CeleryOption, help_group="Filter Options",
              help="Only tasks dead-lettered from this source queue.")
@click.option("--older-than", cls=CeleryOption, type=DURATION, help_group="Filter Options",
              help="Only tasks dead-lettered longer ago than this, e.g. 1d.")
@click.option("--newer-than", cls=CeleryOption, type=DURATION, help_group="Filter Options",
              help="Only tasks dead-lettered within this duration, e.g. 2h.")
@click.option("--limit", cls=CeleryOption, type=click.IntRange(min=1), default=100,
              show_default=True, help_group="Filter Options",
              help="Show at most this many records, newest first.")
@_json_option
@click.pass_context
@_preload_options
def dlq_list(
    ctx: click.Context, /, task_name: str | None, task_id: str | None, category: str | None,
    queue: str | None, older_than: dt.timedelta | None, newer_than: dt.timedelta | None,
    limit: int, as_json: bool, **kwargs: Any,
) -> None:
    """List dead-lettered executions (records with status dlq), newest first."""
    tracker = _tracker(ctx)
    with _reported_errors():
        listing = operations.list_dlq(
            tracker, task_name=task_name, task_id=task_id, category=category, queue=queue,
            older_than=older_than, newer_than=newer_than, limit=limit,
        )
    if as_json:
        _echo_json(ctx, listing.as_dict())
        return
    if not listing.records:
        ctx.obj.echo("No dead-lettered executions match.")
        return
    rows = [[r.get("completedAt"), r.get("taskName"), r.get("taskId"),
             int(r.get("attempt") or 0) + 1, r.get("errorCategory"), r.get("dlqReason"),
             _error(r, 40), r.get("celeryTaskId"), r.get("executionId")]
            for r in listing.records]
    _echo_table(ctx, ["DEAD-LETTERED (UTC)", "TASK NAME", "TASK ID", "ATTEMPTS", "CATEGORY",
                      "REASON", "ERROR", "CELERY TASK ID", "EXECUTION ID"], rows,
                numeric=["ATTEMPTS"])
    ctx.obj.echo(f"{len(listing.records)} of {listing.total} dead-lettered execution(s)")


@dlq.command(name="show", cls=CeleryCommand)
@click.argument("key")
@_json_option
@click.pass_context
@_preload_options
def dlq_show(ctx: click.Context, /, key: str, as_json: bool, **kwargs: Any) -> None:
    """Show one dead-lettered execution with its full error and traceback.

    KEY is an executionId; a taskId or celery task id shows its latest
    dead-lettered execution.
    """
    tracker = _tracker(ctx)
    with _reported_errors():
        record = operations.show_dlq(tracker, key)
    if as_json:
        _echo_json(ctx, record)
        return
    fields = [
        ("Task name", record.get("taskName")), ("Task ID", record.get("taskId")),
        ("Execution ID", record.get("executionId")),
        ("Celery task ID", record.get("celeryTaskId")), ("Status", record.get("status")),
        ("Attempts", int(record.get("attempt") or 0) + 1),
        ("Source queue", record.get("sourceQueue") or record.get("queue")),
        ("DLQ", record.get("dlqQueue")), ("Reason", record.get("dlqReason")),
        ("Category", record.get("errorCategory")), ("Error type", record.get("errorType")),
        ("Error message", record.get("errorMessage")), ("Worker", _worker(record)),
        ("Created (UTC)", record.get("createdAt")), ("Started (UTC)", record.get("startedAt")),
        ("Dead-lettered (UTC)", record.get("completedAt")),
        ("Runtime", _runtime(record.get("runtimeMs"))),
    ]
    if record.get("replayExecutionId"):
        fields += [("Replay execution ID", record["replayExecutionId"]),
                   ("Replay celery task ID", record.get("replayCeleryTaskId"))]
    if record.get("archiveReason"):
        fields.append(("Archived because", record["archiveReason"]))
    width = max(len(name) for name, _ in fields) + 1
    for name, value in fields:
        ctx.obj.echo(f"{(name + ':').ljust(width)} {_cell(value)}")
    ctx.obj.echo("Traceback:")
    ctx.obj.echo(str(record.get("traceback") or "(not recorded)").rstrip())


def _selection_options(command: F) -> F:
    options = [
        click.option("--all", "select_all", cls=CeleryOption, is_flag=True,
                     help_group="Selection Options", help="Every message on the DLQs."),
        click.option("--task-id", "task_ids", cls=CeleryOption, multiple=True,
                     help_group="Selection Options",
                     help="Messages of this taskId; repeat for several."),
        click.option("--execution-id", "execution_ids", cls=CeleryOption, multiple=True,
                     help_group="Selection Options",
                     help="The message of this dead-lettered executionId; repeat for several."),
        click.option("-Q", "--queue", cls=CeleryOption, help_group="Selection Options",
                     help="Read only the DLQ of this source queue."),
        click.option("--limit", cls=CeleryOption, type=click.IntRange(min=1),
                     help_group="Selection Options",
                     help="Act on at most this many messages."),
        click.option("--dry-run", cls=CeleryOption, is_flag=True,
                     help_group="Selection Options",
                     help="Report what would be done and change nothing."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _selection(
    select_all: bool, task_ids: Sequence[str], execution_ids: Sequence[str], queue: str | None,
) -> operations.DlqSelection:
    selection = operations.DlqSelection(all=select_all, task_ids=tuple(task_ids),
                                        execution_ids=tuple(execution_ids), queue=queue)
    try:
        selection.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    return selection


@contextmanager
def _progress(
    tracker: TaskTracker, selection: operations.DlqSelection,
    label: str, enabled: bool,
) -> Iterator[Callable[[], None] | None]:
    """Yield a callback that advances a progress bar on stderr, for long runs."""
    if not enabled:
        yield None
        return
    with _reported_errors():
        names = operations.dlq_queue_names(tracker, selection)
        total = sum(operations.count_dlq_messages(tracker, names).values())
    if total < PROGRESS_MIN_MESSAGES:
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield lambda: bar.update(1)


@dlq.command(name="replay", cls=CeleryCommand)
@_selection_options
@click.option("-f", "--force", cls=CeleryOption, is_flag=True, help_group="Replay Options",
              help="Replay even when another execution of the taskId is active.")
@_json_option
@click.pass_context
@_preload_options
def dlq_replay(
    ctx: click.Context, /, select_all: bool, task_ids: tuple[str, ...],
    execution_ids: tuple[str, ...], queue: str | None, limit: int | None, dry_run: bool,
    force: bool, as_json: bool, **kwargs: Any,
) -> None:
    """Send dead-lettered tasks back to their source queues as new executions.

    Each replay is a new execution of the same taskId, and its replayOf field
    names the dead-lettered execution. The dlq record is archived and the
    message removed from the DLQ. Running the command again resumes an
    interrupted replay without running any task twice. Exits with status 1
    when a message was skipped or a selected id was not found on the DLQs.
    """
    tracker = _tracker(ctx)
    selection = _selection(select_all, task_ids, execution_ids, queue)
    label = "Checking DLQ messages" if dry_run else "Replaying DLQ messages"
    with _progress(tracker, selection, label, not as_json) as progress, \
            _reported_errors():
        report = operations.replay_dlq(tracker, selection, limit=limit, dry_run=dry_run,
                                       force=force, progress=progress)
    _print_report(ctx, report, as_json, verb="replayed")


@dlq.command(name="purge", cls=CeleryCommand)
@_selection_options
@click.option("-f", "--force", cls=CeleryOption, is_flag=True, help_group="Purge Options",
              help="Do not ask for confirmation.")
@_json_option
@click.pass_context
@_preload_options
def dlq_purge(
    ctx: click.Context, /, select_all: bool, task_ids: tuple[str, ...],
    execution_ids: tuple[str, ...], queue: str | None, limit: int | None, dry_run: bool,
    force: bool, as_json: bool, **kwargs: Any,
) -> None:
    """Delete dead-lettered tasks from the DLQs and archive their records.

    There is no undo: the task messages are gone and only the records
    remain. Asks for confirmation unless --force is given. When standard
    input is not a terminal it exits with an error instead of asking.
    """
    tracker = _tracker(ctx)
    selection = _selection(select_all, task_ids, execution_ids, queue)
    if not dry_run:
        with _reported_errors():
            names = operations.dlq_queue_names(tracker, selection)
        _require_confirmation(
            force, f"Delete the selected messages from {', '.join(names) or 'no DLQ'} "
                        "and archive their records? There is no undo.",
        )
    label = "Checking DLQ messages" if dry_run else "Purging DLQ messages"
    with _progress(tracker, selection, label, not as_json) as progress, \
            _reported_errors():
        report = operations.purge_dlq(tracker, selection, limit=limit, dry_run=dry_run,
                                      progress=progress)
    _print_report(ctx, report, as_json, verb="purged")


def _print_report(
    ctx: click.Context, report: operations.DlqReport, as_json: bool, *, verb: str,
) -> None:
    if as_json:
        _echo_json(ctx, report.as_dict())
    elif report.outcomes:
        rows = [[o.action, o.task_name, o.task_id, o.celery_task_id, o.execution_id,
                 o.new_celery_task_id, o.new_execution_id, o.detail] for o in report.outcomes]
        _echo_table(ctx, ["ACTION", "TASK NAME", "TASK ID", "CELERY TASK ID", "EXECUTION ID",
                          "NEW CELERY TASK ID", "NEW EXECUTION ID", "DETAIL"], rows)

    if not as_json:
        counts = ", ".join(f"{action} {report.count(action)}" for action in
                           sorted({o.action for o in report.outcomes})) or f"{verb} 0"
        ctx.obj.echo(f"{counts} (read {report.scanned} DLQ message(s))")
    _fail_on_skipped(report.count("skipped"), report.not_found, on_dlq=True)


def _fail_on_skipped(skipped: int, not_found: Sequence[str], *, on_dlq: bool = False) -> None:
    """Exit with status 1 when part of the selection was not acted on."""
    problems = []
    if not_found:
        problems.append("not found on the DLQs: " + ", ".join(not_found))
    if skipped:
        where = " and left on the DLQ" if on_dlq else ""
        problems.append(f"{skipped} skipped{where}; the DETAIL column says why")
    if problems:
        raise click.ClickException("; ".join(problems))
