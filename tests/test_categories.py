"""Error categories: built-in defaults and the resolution order."""

from __future__ import annotations

import pytest
from billiard.exceptions import SoftTimeLimitExceeded

from celery_tasktracker.categories import categorize


class PartnerDown(ConnectionError):
    pass


class PaymentDeclined(Exception):
    error_category = "permanent"


@pytest.mark.parametrize(("exc", "category"), [
    (ConnectionRefusedError(), "transient"),
    (PartnerDown(), "transient"),
    (TimeoutError(), "timeout"),
    (TimeoutError(), "timeout"),
    (SoftTimeLimitExceeded(), "timeout"),
    (ValueError(), "validation"),
    (TypeError(), "validation"),
    (KeyError("k"), "validation"),
    (AttributeError(), "permanent"),
    (ZeroDivisionError(), "permanent"),
    (Exception(), "unknown"),
])
def test_builtin_categories(exc: BaseException, category: str) -> None:
    assert categorize(exc) == category


def test_exception_attribute_wins() -> None:
    assert categorize(PaymentDeclined(), task_categories={
        "tests.test_categories.PaymentDeclined": "transient"}) == "permanent"


def test_task_mapping_beats_app_mapping() -> None:
    exc = ValueError("rate limited")

    category = categorize(
        exc,
        task_categories={"builtins.ValueError": "transient"},
        app_categories={"builtins.ValueError": "permanent"},
    )

    assert category == "transient"


def test_app_mapping_matches_subclasses() -> None:
    assert categorize(PartnerDown(), app_categories={
        "builtins.ConnectionError": "permanent"}) == "permanent"
