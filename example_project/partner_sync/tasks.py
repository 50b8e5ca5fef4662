"""Tracked tasks of the partner sync app: poll a partner, sync one flight log."""

from __future__ import annotations

import datetime as dt
from typing import Any

from celery.utils import uuid
from celery.utils.log import get_logger

from celery_tasktracker import TrackedTask

from . import storage
from .celery_app import app
from .partner_api import FlightLogRef, PartnerAPI

__all__ = [
    "SYNC_SETTLE_SECONDS",
    "poll_partner_logs",
    "schedule_sync",
    "sync_flight_log",
    "validate_flight_log",
]

logger = get_logger(__name__)

#: Seconds a sync task waits after it is sent. Partners list a log while
#: they may still append to it, so the sync fetches it a moment later.
SYNC_SETTLE_SECONDS = 2.0


def _partner_api() -> PartnerAPI:
    return PartnerAPI(request_log=storage.collection(app, storage.API_REQUESTS))


def schedule_sync(ref: FlightLogRef) -> bool:
    """Send the sync task of one flight log and return False if the send was deduplicated.

    A duplicate send returns the AsyncResult of the active execution, whose
    celery task id differs from the one this call generated.
    """
    celery_task_id = uuid()
    result = sync_flight_log.apply_async(
        (ref.partner, ref.aircraft_id, ref.log_id),
        task_id=celery_task_id, countdown=SYNC_SETTLE_SECONDS,
    )
    return bool(result.id == celery_task_id)


@app.task(base=TrackedTask, bind=True, name="partner_sync.poll_partner_logs",
          tracking_namespace="partner_polls", tracking_key_args=("partner", "window"))
def poll_partner_logs(self: TrackedTask, partner: str, window: str) -> str:
    """List the flight logs of *partner* and send one sync task per log.

    *window* names the poll cycle (``YYYYMMDDTHHMM``), so a scheduler that
    fires twice for one cycle sends one poll only. Consecutive cycles list
    overlapping logs. The tracker drops the sync sends of logs whose sync
    task is still queued, running or waiting for a retry.
    """
    refs = _partner_api().list_flight_logs(partner)
    sent = sum(1 for ref in refs if schedule_sync(ref))
    logger.info(
        "poll of partner %s for window %s (celery task id %s): %d flight logs listed, "
        "%d sync tasks sent, %d deduplicated",
        partner, window, self.request.id, len(refs), sent, len(refs) - sent,
    )
    return f"listed {len(refs)}, sent {sent}, deduplicated {len(refs) - sent}"


@app.task(base=TrackedTask, bind=True, name="partner_sync.sync_flight_log",
          tracking_namespace="partner_tasks",
          tracking_key_args=("partner", "aircraft_id", "log_id"),
          max_retries=3, default_retry_delay=0.2)
def sync_flight_log(self: TrackedTask, partner: str, aircraft_id: str, log_id: str) -> str:
    """Fetch one flight log from its partner and upsert it into ``flight_logs``.

    The tracker retries a ``PartnerUnavailableError``, which is a
    ``ConnectionError``, up to ``max_retries`` times. A ``ValueError`` from
    validation sends the task to the dead-letter queue at once. ``syncCount``
    counts the upserts of a log, so a log synced twice shows ``syncCount: 2``.
    """
    ref = FlightLogRef(partner, aircraft_id, log_id)
    payload = _partner_api().fetch_flight_log(ref, attempt=self.request.retries)
    record = validate_flight_log(payload)

    now = dt.datetime.now(dt.timezone.utc)
    storage.collection(self.app, storage.FLIGHT_LOGS).update_one(
        {"_id": f"{partner}:{aircraft_id}:{log_id}"},
        {"$set": {**record, "lastSyncedAt": now},
         "$setOnInsert": {"firstSyncedAt": now},
         "$inc": {"syncCount": 1}},
        upsert=True,
    )
    logger.info(
        "synced flight log %s of aircraft %s from partner %s (celery task id %s, "
        "attempt %d)", log_id, aircraft_id, partner, self.request.id, self.request.retries,
    )
    return f"synced {record['minutes']} min, {record['sprayedHectares']} ha"


def validate_flight_log(payload: dict[str, Any]) -> dict[str, Any]:
    """Return the fields of a flight log to store, converted from the partner's payload.

    Raises:
        ValueError: naming the log and the bad value when the payload is
            inconsistent; the partner has to export the log again.
    """
    takeoff_at = dt.datetime.fromisoformat(payload["takeoffAt"])
    landing_at = dt.datetime.fromisoformat(payload["landingAt"])
    if landing_at <= takeoff_at:
        raise ValueError(
            f"flight log {payload['logId']} of aircraft {payload['aircraftId']} from "
            f"partner {payload['partner']} lands at {payload['landingAt']}, not after "
            f"takeoff at {payload['takeoffAt']}: ask the partner to export it again"
        )
    hectares = float(payload["sprayedHectares"])
    if hectares < 0:
        raise ValueError(
            f"flight log {payload['logId']} reports {hectares!r} sprayed hectares; "
            "expected 0 or more"
        )
    return {
        "partner": payload["partner"],
        "aircraftId": payload["aircraftId"],
        "logId": payload["logId"],
        "takeoffAt": takeoff_at,
        "landingAt": landing_at,
        "minutes": round((landing_at - takeoff_at).total_seconds() / 60),
        "sprayedHectares": hectares,
    }
