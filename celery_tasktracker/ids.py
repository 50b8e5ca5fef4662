"""Generation and validation of taskIds and executionIds.

A taskId is ``<namespace>:<part>:<part>...``. Every part is escaped so that
the separator never appears inside a part, which makes the mapping from
(namespace, parts) to taskId injective: two different argument lists never
join to the same key. Keys longer than :data:`MAX_TASK_ID_LENGTH` keep a
readable prefix and end with a digest of the full key.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import hashlib
import inspect
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .exceptions import InvalidTaskIdError, TaskIdError

__all__ = [
    "MAX_TASK_ID_LENGTH",
    "bind_arguments",
    "build_task_id",
    "canonical_digest",
    "canonical_encode",
    "join_task_id",
    "new_execution_id",
    "render_part",
    "validate_execution_id",
    "validate_task_id",
]

#: Maximum length of a taskId stored as is; longer keys are shortened with a digest.
MAX_TASK_ID_LENGTH = 200

#: Hex characters of the SHA-256 digest used for default keys and shortening.
DIGEST_LENGTH = 32

SEPARATOR = ":"

_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-]+")
_TASK_ID = re.compile(r"[A-Za-z0-9_.\-]+(:[^:\s]*)*")


def new_execution_id() -> str:
    """Return a new executionId: a random UUID version 4 in canonical form."""
    return str(uuid.uuid4())


def validate_execution_id(value: object) -> str:
    """Return *value* if it is a canonical UUID v4 string, else raise."""
    if not isinstance(value, str):
        raise InvalidTaskIdError(
            f"invalid executionId {value!r}: expected a UUID v4 string such as "
            f"{new_execution_id()!r}"
        )
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.version != 4 or str(parsed) != value:
        raise InvalidTaskIdError(
            f"invalid executionId {value!r}: expected a lowercase UUID v4 string "
            f"such as {new_execution_id()!r}"
        )
    return value


def validate_task_id(value: object) -> str:
    """Return *value* if it has the form of a taskId, else raise."""
    if not isinstance(value, str) or not value:
        raise InvalidTaskIdError(
            f"invalid taskId {value!r}: expected a non-empty string such as "
            "'partner_tasks:SATLOC:695d:02220710'"
        )
    if len(value) > MAX_TASK_ID_LENGTH:
        raise InvalidTaskIdError(
            f"invalid taskId {value[:40]!r}...: {len(value)} characters is longer than "
            f"the limit of {MAX_TASK_ID_LENGTH}; build it with build_task_id(), which "
            "shortens long keys"
        )
    if not _TASK_ID.fullmatch(value):
        raise InvalidTaskIdError(
            f"invalid taskId {value!r}: expected '<namespace>:<part>...' where the "
            "namespace holds letters, digits, '_', '.' or '-' and parts hold no "
            "whitespace"
        )
    return value


def _escape(text: str) -> str:
    # Percent-encode the escape character itself, the separator and
    # whitespace, so a part never contains the separator.
    out: list[str] = []
    for char in text:
        if char in "%:~" or char.isspace() or not char.isprintable():
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
        else:
            out.append(char)
    return "".join(out)


def render_part(value: Any) -> str:
    """Render one named key part as readable, injective text.

    Strings and integers read as themselves (``SATLOC``, ``42``). A string
    that would read as an integer gets its first character percent-encoded,
    so ``5`` and ``"5"`` stay different keys. Every other type is tagged with
    ``~``: ``~none``, ``~true``, ``~uuid.<hex>``, ``~dt.<iso>`` and so on;
    containers become ``~h.<digest>`` of their canonical encoding.
    """
    if isinstance(value, str):
        escaped = _escape(value)
        if not escaped:
            return "%"
        if _CANONICAL_INT.fullmatch(escaped):
            return f"%{ord(escaped[0]):02X}{escaped[1:]}"
        return escaped
    if value is None:
        return "~none"
    if isinstance(value, bool):
        return "~true" if value else "~false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, uuid.UUID):
        return f"~uuid.{value.hex}"
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return "~dt." + _escape(_encode_temporal(value))
    if isinstance(value, decimal.Decimal):
        return "~dec." + _escape(_encode_decimal(value))
    if isinstance(value, float):
        return "~f." + _escape(repr(value))
    return "~h." + canonical_digest(value)[:16]


def build_task_id(namespace: str, parts: Iterable[Any]) -> str:
    """Render *parts* and join them under *namespace* into a taskId."""
    return join_task_id(namespace, [render_part(part) for part in parts])


def join_task_id(namespace: str, rendered_parts: Sequence[str]) -> str:
    """Join *namespace* and parts already rendered by :func:`render_part`.

    Raises:
        InvalidTaskIdError: if the namespace contains characters other than
            letters, digits, ``_``, ``.`` and ``-``.
    """
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise InvalidTaskIdError(
            f"invalid taskId namespace {namespace!r}: use letters, digits, '_', '.' "
            "or '-', for example 'partner_tasks'"
        )
    key = SEPARATOR.join([namespace, *rendered_parts])
    if len(key) <= MAX_TASK_ID_LENGTH:
        return key
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:DIGEST_LENGTH]
    keep = MAX_TASK_ID_LENGTH - DIGEST_LENGTH - 2
    # "~" never appears unescaped inside a part, so a shortened key can
    # never equal a key that was short enough to keep.
    return f"{key[:keep]}~{SEPARATOR}{digest}"


def bind_arguments(
    func: Callable[..., Any],
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Bind *args* and *kwargs* to the signature of *func*, defaults filled in.

    The result maps parameter names to values in signature order, so calls
    that differ only in how arguments are passed bind to the same mapping.
    ``*args`` binds to a tuple and ``**kwargs`` to a dict under their names.

    Raises:
        TaskIdError: if the arguments do not fit the signature.
    """
    signature = _signature_of(func)
    try:
        bound = signature.bind(*(args or ()), **(kwargs or {}))
    except TypeError as exc:
        name = getattr(func, "__qualname__", repr(func))
        raise TaskIdError(
            f"cannot build a taskId: arguments args={args!r} kwargs={kwargs!r} do not "
            f"match the signature {name}{signature}: {exc}"
        ) from exc
    bound.apply_defaults()
    return dict(bound.arguments)


@functools.lru_cache(maxsize=1024)
def _cached_signature(func: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(func)


def _signature_of(func: Callable[..., Any]) -> inspect.Signature:
    # inspect.signature() costs more than binding the arguments, and a task's
    # signature never changes. A bound method hashes by its instance and
    # function, so every access to ``task.run`` finds the same entry.
    try:
        return _cached_signature(func)
    except TypeError:
        # An unhashable callable.
        return inspect.signature(func)


def canonical_digest(value: Any) -> str:
    """Return the SHA-256 hex digest of the canonical encoding of *value*."""
    return hashlib.sha256(canonical_encode(value).encode("utf-8")).hexdigest()


def canonical_encode(value: Any) -> str:
    """Encode *value* as text that is equal exactly when the values are equal.

    The encoding is stable across processes and Python versions (no
    ``hash()``, no ``repr()`` of arbitrary objects) and survives Celery's JSON
    serializer: tuples and lists encode alike because JSON turns one into the
    other on the way to the worker.

    Raises:
        TaskIdError: for a type with no canonical form.
    """
    if value is None:
        return "n"
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, int):
        return f"i{value};"
    if isinstance(value, float):
        return f"f{value!r};"
    if isinstance(value, str):
        return f"s{len(value)}:{value}"
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return f"b{len(data)}:{data.hex()}"
    if isinstance(value, uuid.UUID):
        return f"u{value.hex}"
    if isinstance(value, dt.datetime | dt.date | dt.time):
        text = _encode_temporal(value)
        return f"t{len(text)}:{text}"
    if isinstance(value, decimal.Decimal):
        text = _encode_decimal(value)
        return f"d{len(text)}:{text}"
    if isinstance(value, Mapping):
        items = sorted(
            (canonical_encode(key), canonical_encode(item)) for key, item in value.items()
        )
        return "{" + "".join(key + item for key, item in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + "".join(canonical_encode(item) for item in value) + "]"
    if isinstance(value, set | frozenset):
        return "<" + "".join(sorted(canonical_encode(item) for item in value)) + ">"
    raise TaskIdError(
        f"cannot build a taskId from a value of type {type(value).__qualname__}: "
        f"{value!r}; name the identifying arguments with tracking_key_args, or give "
        "the task a tracking_key_func that returns strings or numbers"
    )


def _encode_temporal(value: dt.datetime | dt.date | dt.time) -> str:
    # Aware datetimes are normalised to UTC so the same instant gives the
    # same key whatever the sender's time zone.
    if isinstance(value, dt.datetime) and value.utcoffset() is not None:
        value = value.astimezone(dt.timezone.utc)
    return value.isoformat()


def _encode_decimal(value: decimal.Decimal) -> str:
    # Decimal("1.50") == Decimal("1.5"), so both encode as their normal form.
    if value.is_finite() and value == value.to_integral_value():
        return str(value.quantize(decimal.Decimal(1)))
    return str(value.normalize())
