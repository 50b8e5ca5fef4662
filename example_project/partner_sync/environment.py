"""The ``TASKTRACKER_DEMO_*`` environment variables that configure the partner sync app.

This module only reads the environment, so the demo can import it before
it sets the variables that the app module reads at import.
"""

from __future__ import annotations

import os
from typing import Any

from celery.exceptions import ImproperlyConfigured

__all__ = [
    "BROKER_FOLDER_VARIABLE",
    "BROKER_URL_VARIABLE",
    "DATABASE_VARIABLE",
    "DEFAULT_DATABASE",
    "MONGODB_URI_VARIABLE",
    "QUEUE",
    "app_settings",
    "filesystem_folders",
]

#: Broker URL, e.g. ``redis://127.0.0.1:6379/12`` or ``filesystem://``.
BROKER_URL_VARIABLE = "TASKTRACKER_DEMO_BROKER_URL"
#: MongoDB URI of the tracking store and of the ``flight_logs`` collection.
MONGODB_URI_VARIABLE = "TASKTRACKER_DEMO_MONGODB_URI"
#: Database of the tracker records and the business collections.
DATABASE_VARIABLE = "TASKTRACKER_DEMO_DATABASE"
#: Folder of the filesystem transport's queues, used only with ``filesystem://``.
BROKER_FOLDER_VARIABLE = "TASKTRACKER_DEMO_BROKER_FOLDER"

DEFAULT_DATABASE = "partner_sync"

#: Queue of every partner sync task. Dead-lettered tasks go to ``partner_sync.dlq``.
QUEUE = "partner_sync"

#: Seconds between two scans of the queue folder by the filesystem transport.
#: kombu's default of 1 s would add a second to every hop.
FILESYSTEM_POLLING_INTERVAL = 0.1


def _required_variable(name: str, example: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise ImproperlyConfigured(
            f"environment variable {name} is not set: set it, for example "
            f"{name}={example}, or run `python -m example_project.demo`, which sets it "
            "for the worker it starts"
        )
    return value


def filesystem_folders(root: str) -> dict[str, str]:
    """Return the queue and control folders of the filesystem transport under *root*."""
    return {
        "queue": os.path.join(root, "queue"),
        "control": os.path.join(root, "control"),
    }


def _transport_options(broker_url: str) -> dict[str, Any]:
    if not broker_url.startswith("filesystem://"):
        return {}
    root = _required_variable(BROKER_FOLDER_VARIABLE, "/tmp/partner-sync-broker")
    folders = filesystem_folders(root)
    for path in folders.values():
        if not os.path.isdir(path):
            raise ImproperlyConfigured(
                f"broker folder {path!r} does not exist: create {root!r} with the "
                f"subfolders 'queue' and 'control', or point {BROKER_FOLDER_VARIABLE} "
                "at the folder the demo prints"
            )
    # Producers and workers share one folder, so messages written by one
    # are read by the other. The control folder contains exchange bindings,
    # which would otherwise land in the working directory.
    return {
        "data_folder_in": folders["queue"],
        "data_folder_out": folders["queue"],
        "control_folder": folders["control"],
        "polling_interval": FILESYSTEM_POLLING_INTERVAL,
    }


def app_settings() -> dict[str, Any]:
    """Return the Celery and tracker settings that the environment selects.

    Raises:
        ImproperlyConfigured: naming the missing environment variable or folder.
    """
    broker_url = _required_variable(BROKER_URL_VARIABLE, "redis://127.0.0.1:6379/12")
    mongodb_uri = _required_variable(MONGODB_URI_VARIABLE, "mongodb://127.0.0.1:27017")
    return {
        "broker_url": broker_url,
        "broker_transport_options": _transport_options(broker_url),
        "tasktracker_mongodb_uri": mongodb_uri,
        "tasktracker_database": os.environ.get(DATABASE_VARIABLE) or DEFAULT_DATABASE,
    }
