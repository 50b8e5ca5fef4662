"""Classification of task errors into categories that drive retries."""

from __future__ import annotations

import socket
from collections.abc import Mapping

from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from kombu.exceptions import OperationalError as KombuOperationalError

__all__ = [
    "PERMANENT",
    "TIMEOUT",
    "TRANSIENT",
    "UNKNOWN",
    "VALIDATION",
    "categorize",
]

TRANSIENT = "transient"
TIMEOUT = "timeout"
VALIDATION = "validation"
PERMANENT = "permanent"
UNKNOWN = "unknown"

# Checked in order, so subclasses come before their bases: TimeoutError is an
# OSError but belongs to "timeout", not "transient".
_BUILTIN: tuple[tuple[tuple[type[BaseException], ...], str], ...] = (
    ((TimeLimitExceeded, SoftTimeLimitExceeded, TimeoutError, socket.timeout), TIMEOUT),
    ((ConnectionError, KombuOperationalError, OSError), TRANSIENT),
    ((ValueError, TypeError, KeyError, LookupError, UnicodeError), VALIDATION),
    ((AttributeError, NameError, NotImplementedError, AssertionError,
      ArithmeticError, ImportError, RuntimeError), PERMANENT),
)

# Transient errors of optional libraries, matched by class path so that none
# of them has to be installed.
_TRANSIENT_PATHS = frozenset({
    "pymongo.errors.AutoReconnect",
    "pymongo.errors.ConnectionFailure",
    "pymongo.errors.NetworkTimeout",
    "pymongo.errors.ServerSelectionTimeoutError",
    "redis.exceptions.ConnectionError",
    "redis.exceptions.TimeoutError",
    "amqp.exceptions.ConnectionError",
    "requests.exceptions.ConnectionError",
    "requests.exceptions.Timeout",
    "httpx.TransportError",
    "urllib3.exceptions.HTTPError",
})


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _lookup(exc: BaseException, mapping: Mapping[str, str]) -> str | None:
    # Walk the MRO so a mapping for a base class covers its subclasses.
    for cls in type(exc).__mro__:
        category = mapping.get(_class_path(cls)) or mapping.get(cls.__qualname__)
        if category:
            return category
    return None


def categorize(
    exc: BaseException,
    *,
    task_categories: Mapping[str, str] | None = None,
    app_categories: Mapping[str, str] | None = None,
) -> str:
    """Return the error category of *exc*.

    Resolution order: an ``error_category`` attribute on the exception, the
    task's own mapping, the app's ``tasktracker_error_categories``, then the
    built-in defaults. Mappings are keyed by dotted exception class path (or
    bare class name) and also match subclasses.
    """
    explicit = getattr(exc, "error_category", None)
    if isinstance(explicit, str) and explicit:
        return explicit.lower()

    for mapping in (task_categories, app_categories):
        if mapping:
            found = _lookup(exc, mapping)
            if found:
                return found.lower()

    for cls in type(exc).__mro__:
        if _class_path(cls) in _TRANSIENT_PATHS:
            return TRANSIENT
    for classes, category in _BUILTIN:
        if isinstance(exc, classes):
            return category
    return UNKNOWN
