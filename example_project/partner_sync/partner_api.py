"""A simulated partner API that lists aircraft flight logs and serves their contents.

The outcome of every request is fixed by the requested log id and attempt
number, so each run of the demo fails, retries and dead-letters the same logs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
from typing import Any

from pymongo.collection import Collection

__all__ = [
    "CATALOG",
    "FlightLogRef",
    "PartnerAPI",
    "PartnerUnavailableError",
    "SimulatedFlightLog",
    "UnknownPartnerError",
]


class PartnerUnavailableError(ConnectionError):
    """The partner API did not respond, which celery_tasktracker categorizes as ``transient``."""


class UnknownPartnerError(LookupError):
    """The requested partner code or flight log does not exist in the simulation."""


@dataclasses.dataclass(frozen=True)
class FlightLogRef:
    """The identity of one flight log: partner code, aircraft id and log id."""

    partner: str
    aircraft_id: str
    log_id: str


@dataclasses.dataclass(frozen=True)
class SimulatedFlightLog:
    """One flight log stored at a partner, with the faults the simulation injects."""

    aircraft_id: str
    #: Partner log id: takeoff month, day, hour and minute (``MMDDHHMM``).
    log_id: str
    takeoff_at: dt.datetime
    minutes: int
    sprayed_hectares: float
    #: Number of first requests for this log that fail with PartnerUnavailableError.
    outage_attempts: int = 0
    #: True when the partner serves the log with a landing time before takeoff.
    corrupt: bool = False


def _flight(aircraft_id: str, log_id: str, minutes: int, hectares: float,
            **faults: Any) -> SimulatedFlightLog:
    takeoff = dt.datetime.strptime(f"2025{log_id}", "%Y%m%d%H%M").replace(tzinfo=dt.timezone.utc)
    return SimulatedFlightLog(aircraft_id, log_id, takeoff, minutes, hectares, **faults)


#: Flight logs per partner code. Four of the eight logs carry a fault: two
#: recover after outages, one stays unavailable for longer than a sync task
#: retries, and one is corrupt.
CATALOG: dict[str, tuple[SimulatedFlightLog, ...]] = {
    "SATLOC": (
        _flight("695d", "02220710", 42, 61.5),
        _flight("695d", "02221135", 37, 48.0, outage_attempts=1),
        _flight("695d", "02221402", 55, 80.2),
        _flight("7c21", "02220815", 28, 35.7, outage_attempts=2),
        _flight("7c21", "02221620", 33, 40.1, corrupt=True),
    ),
    "AGNAV": (
        _flight("a3f0", "02230905", 46, 66.3),
        _flight("a3f0", "02231210", 51, 72.9, outage_attempts=5),
        _flight("b812", "02230640", 24, 30.4),
    ),
}


class PartnerAPI:
    """Client of the simulated partner API.

    When *request_log* is given, every request for a flight log is inserted
    into it, like the access log of a real partner. The demo counts those
    entries to check that no attempt ran twice.
    """

    def __init__(self, *, request_log: Collection[dict[str, Any]] | None = None,
                 latency: float = 0.05) -> None:
        self.request_log = request_log
        #: Seconds each request takes, so task runs overlap as they would in production.
        self.latency = latency

    def list_flight_logs(self, partner: str) -> list[FlightLogRef]:
        """Return the flight logs that *partner* has published, oldest log id first."""
        logs = self._partner_logs(partner)
        time.sleep(self.latency)
        return [FlightLogRef(partner, log.aircraft_id, log.log_id)
                for log in sorted(logs, key=lambda log: log.log_id)]

    def fetch_flight_log(self, ref: FlightLogRef, *, attempt: int) -> dict[str, Any]:
        """Return the contents of one flight log as the partner serves them.

        *attempt* is the zero-based attempt number of the sync task. It drives
        the simulated outages and is recorded in the request log.

        Raises:
            PartnerUnavailableError: during a simulated outage of this log.
            UnknownPartnerError: if the partner or the log does not exist.
        """
        log = self._find(ref)
        self._record_request(ref, attempt)
        time.sleep(self.latency)
        if attempt < log.outage_attempts:
            raise PartnerUnavailableError(
                f"partner {ref.partner} did not respond to the request for flight log "
                f"{ref.log_id} of aircraft {ref.aircraft_id} (attempt {attempt})"
            )

        landing_at = log.takeoff_at + dt.timedelta(minutes=log.minutes)
        if log.corrupt:
            landing_at = log.takeoff_at - dt.timedelta(minutes=log.minutes)
        return {
            "partner": ref.partner,
            "aircraftId": ref.aircraft_id,
            "logId": ref.log_id,
            "takeoffAt": log.takeoff_at.isoformat(),
            "landingAt": landing_at.isoformat(),
            "sprayedHectares": log.sprayed_hectares,
        }

    def _partner_logs(self, partner: str) -> tuple[SimulatedFlightLog, ...]:
        logs = CATALOG.get(partner)
        if logs is None:
            raise UnknownPartnerError(
                f"unknown partner code {partner!r}: the simulated API serves "
                f"{sorted(CATALOG)!r}"
            )
        return logs

    def _find(self, ref: FlightLogRef) -> SimulatedFlightLog:
        for log in self._partner_logs(ref.partner):
            if (log.aircraft_id, log.log_id) == (ref.aircraft_id, ref.log_id):
                return log
        raise UnknownPartnerError(
            f"partner {ref.partner} has no flight log {ref.log_id!r} for aircraft "
            f"{ref.aircraft_id!r}; list the published logs with list_flight_logs()"
        )

    def _record_request(self, ref: FlightLogRef, attempt: int) -> None:
        if self.request_log is None:
            return
        self.request_log.insert_one({
            "partner": ref.partner,
            "aircraftId": ref.aircraft_id,
            "logId": ref.log_id,
            "attempt": attempt,
            "pid": os.getpid(),
            "requestedAt": dt.datetime.now(dt.timezone.utc),
        })
