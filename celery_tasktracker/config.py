"""Every ``tasktracker_*`` setting: its default, type and validation."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from celery.exceptions import ImproperlyConfigured

__all__ = [
    "DUPLICATE_POLICIES",
    "SETTINGS",
    "STORE_UNAVAILABLE_POLICIES",
    "Setting",
    "TrackerConfig",
    "mask_uri",
]

DUPLICATE_POLICIES = ("return_existing", "raise")
MODES = ("enforce", "observe")
STORE_UNAVAILABLE_POLICIES = ("raise", "send_untracked")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One ``tasktracker_*`` setting as documented in the configuration reference."""

    #: Name without the ``tasktracker_`` prefix.
    name: str
    #: Value used when the app does not set it; ``None`` for a required setting.
    default: Any
    #: Short type description shown in errors and docs.
    type_name: str
    #: One-line meaning.
    doc: str
    #: Converts and validates a raw value; raises ``ValueError`` naming the fix.
    parse: Callable[[Any], Any]
    required: bool = False

    @property
    def key(self) -> str:
        """The full Celery setting name."""
        return f"tasktracker_{self.name}"


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _optional_string(value: Any) -> str | None:
    return None if value is None else _string(value)


def _mongodb_uri(value: Any) -> str:
    text = _string(value)
    if not text.startswith(("mongodb://", "mongodb+srv://")):
        raise ValueError("expected a URI starting with 'mongodb://' or 'mongodb+srv://'")
    return text


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError("expected a number of seconds greater than 0")
    return float(value)


def _optional_positive_number(value: Any) -> float | None:
    return None if value is None else _positive_number(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("expected a whole number greater than 0")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected True or False")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(repr(c) for c in choices))
        return str(value)

    return parse


def _categories(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset):
        raise ValueError("expected a list of category names such as ['transient', 'timeout']")
    return tuple(_string(item).lower() for item in value)


def _optional_names(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset):
        raise ValueError("expected None (all) or a list of names such as ['billing', 'sync']")
    return frozenset(_string(item) for item in value)


def _category_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(
            "expected a mapping of exception class paths to categories, such as "
            "{'requests.ConnectionError': 'transient'}"
        )
    parsed = {}
    for exc_path, category in value.items():
        if not isinstance(exc_path, str) or "." not in exc_path:
            raise ValueError(
                f"key {exc_path!r} is not a dotted exception class path such as "
                "'requests.ConnectionError'"
            )
        parsed[exc_path] = _string(category).lower()
    return parsed


SETTINGS: tuple[Setting, ...] = (
    Setting("mongodb_uri", None, "str", "MongoDB connection URI of the tracking store.",
            _mongodb_uri, required=True),
    Setting("enabled", True, "bool",
            "False turns tracking off for the whole app: tracked tasks behave as plain "
            "Celery tasks and make no store round trip.", _bool),
    Setting("mode", "enforce", "str",
            "'enforce' rejects duplicate sends and skips duplicate deliveries; 'observe' "
            "records what enforce would do but publishes and runs everything.",
            _choice(MODES)),
    Setting("queues", None, "list of str or None",
            "Queues whose tasks are tracked; None tracks every queue.", _optional_names),
    Setting("tasks", None, "list of str or None",
            "Names of the tasks that are tracked; None tracks every task with the "
            "tracked base class.", _optional_names),
    Setting("database", None, "str or None",
            "Database name; None uses the database in the URI, else 'celery_tasktracker'.",
            _optional_string),
    Setting("collection", "task_tracker", "str", "Collection holding one document per "
            "execution.", _string),
    Setting("mongodb_timeout", 5.0, "float (seconds)", "Server selection, connect and "
            "socket timeout of store operations.", _positive_number),
    Setting("duplicate_policy", "return_existing", "str",
            "What a duplicate send returns: 'return_existing' gives the active "
            "execution's AsyncResult, 'raise' raises DuplicateTaskError.",
            _choice(DUPLICATE_POLICIES)),
    Setting("dedup_window", 300.0, "float (seconds)",
            "How long a queued execution blocks equal sends; a later ETA or countdown "
            "extends it.", _positive_number),
    Setting("lease", 60.0, "float (seconds)",
            "How long a claim stays valid without renewal; an execution whose lease has "
            "lapsed may be claimed again.", _positive_number),
    Setting("lease_renewal_interval", None, "float (seconds) or None",
            "How often a worker renews the leases of its running executions; None "
            "means a third of tasktracker_lease.", _optional_positive_number),
    Setting("retry_categories", ("transient", "timeout"), "list of str",
            "Error categories that the tracked base class retries automatically.",
            _categories),
    Setting("error_categories", {}, "dict of str to str",
            "Extra exception class paths mapped to categories, checked before the "
            "built-in defaults.", _category_map),
    Setting("dlq_enabled", True, "bool",
            "Publish finally failed tasks to the dead-letter queue.", _bool),
    Setting("dlq_suffix", ".dlq", "str",
            "Suffix appended to the source queue name to form the DLQ name.", _string),
    Setting("dlq_in_task_queues", False, "bool",
            "Add every DLQ to the app's task queues so tools that list task_queues show "
            "them; workers still consume a DLQ only when named with -Q.", _bool),
    Setting("result_max_length", 200, "int (characters)",
            "Longest result summary stored on a completed execution.", _positive_int),
    Setting("traceback_max_length", 4000, "int (characters)",
            "Longest traceback stored on a failed execution; the end is kept.",
            _positive_int),
    Setting("retention", 30 * 24 * 3600.0, "float (seconds)",
            "How long finished records are kept before MongoDB's TTL monitor "
            "removes them; applied when the index is first created.", _positive_number),
    Setting("store_unavailable", "raise", "str",
            "What a send does when MongoDB is unreachable: 'raise' fails the send, "
            "'send_untracked' publishes without tracking and logs a warning.",
            _choice(STORE_UNAVAILABLE_POLICIES)),
)

_BY_NAME = {setting.name: setting for setting in SETTINGS}


def mask_uri(uri: str) -> str:
    """Return *uri* with any password replaced by ``***``."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    if parts.password is None:
        return uri
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
    """Validated ``tasktracker_*`` settings of one Celery app."""

    mongodb_uri: str
    enabled: bool
    mode: str
    queues: frozenset[str] | None
    tasks: frozenset[str] | None
    database: str | None
    collection: str
    mongodb_timeout: float
    duplicate_policy: str
    dedup_window: float
    lease: float
    lease_renewal_interval: float | None
    retry_categories: tuple[str, ...]
    error_categories: dict[str, str]
    dlq_enabled: bool
    dlq_suffix: str
    dlq_in_task_queues: bool
    result_max_length: int
    traceback_max_length: int
    retention: float
    store_unavailable: str

    @classmethod
    def from_mapping(cls, conf: Mapping[str, Any]) -> TrackerConfig:
        """Read and validate every setting from a Celery configuration.

        Raises:
            ImproperlyConfigured: naming the first invalid or missing setting,
                its value and the fix.
        """
        # A misspelt name is reported first: it is often why a required
        # setting looks missing.
        _check_unknown(conf)
        values = {}
        for setting in SETTINGS:
            raw = conf.get(setting.key, setting.default)
            if raw is None and setting.required:
                raise ImproperlyConfigured(
                    f"{setting.key} is not set: {setting.doc} Set it on the Celery app, "
                    f"for example app.conf.{setting.key} = 'mongodb://127.0.0.1:27017/app'"
                )
            try:
                values[setting.name] = setting.parse(raw)
            except ValueError as exc:
                shown = mask_uri(raw) if isinstance(raw, str) else raw
                raise ImproperlyConfigured(
                    f"invalid {setting.key} {shown!r}: {exc} ({setting.type_name}; "
                    f"default {setting.default!r})"
                ) from exc
        return cls(**values)

    def tracks(self, task_name: str, queue: str | None) -> bool:
        """Return whether sends and executions of *task_name* on *queue* are tracked."""
        if not self.enabled:
            return False
        if self.tasks is not None and task_name not in self.tasks:
            return False
        return self.queues is None or queue in self.queues

    @property
    def renewal_interval(self) -> float:
        """Seconds between two lease renewals of one worker."""
        return self.lease_renewal_interval or self.lease / 3

    @property
    def masked_uri(self) -> str:
        """The MongoDB URI with its password masked, safe to log."""
        return mask_uri(self.mongodb_uri)


def _check_unknown(conf: Mapping[str, Any]) -> None:
    # A misspelt setting would otherwise be ignored silently.
    for key in list(conf.keys()):
        if isinstance(key, str) and key.startswith("tasktracker_"):
            name = key[len("tasktracker_"):]
            if name not in _BY_NAME:
                close = difflib.get_close_matches(key, [s.key for s in SETTINGS], n=1)
                hint = (f"did you mean {close[0]!r}?" if close else
                        "the known settings are: " + ", ".join(s.key for s in SETTINGS))
                raise ImproperlyConfigured(f"unknown setting {key!r}; {hint}")
