"""The configuration reference in docs/ lists exactly the settings and task options."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from celery_tasktracker import SETTINGS, TrackedTask

CONFIGURATION_PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.rst"

# A name must not be part of a longer identifier such as celery_tasktracker_x.
SETTING_NAME = re.compile(r"(?<![A-Za-z0-9_])tasktracker_[a-z0-9_]+")
TASK_OPTION_NAME = re.compile(r"(?<![A-Za-z0-9_])tracking_[a-z0-9_]+")

# Each row of a list-table starts with "* - ", and its first cell contains the name.
TABLE_ROW = re.compile(r"^\s*\* - ", re.MULTILINE)


@pytest.fixture(scope="module")
def page() -> str:
    return CONFIGURATION_PAGE.read_text(encoding="utf-8")


def table_rows(page: str) -> dict[str, str]:
    """Map the name in the first cell of each list-table row to the row's text."""
    rows = {}
    for chunk in TABLE_ROW.split(page)[1:]:
        name = re.match(r"``([^`]+)``", chunk)
        if name:
            rows[name.group(1)] = chunk
    return rows


def task_options() -> set[str]:
    """Return the ``tracking_*`` class attributes of TrackedTask, without methods."""
    names = set()
    for name in dir(TrackedTask):
        value = inspect.getattr_static(TrackedTask, name)
        if name.startswith("tracking_") and not inspect.isfunction(value):
            names.add(name)
    return names


def test_every_setting_documented(page: str) -> None:
    documented = set(SETTING_NAME.findall(page))

    for setting in SETTINGS:
        assert setting.key in documented, f"{setting.key} is missing from {CONFIGURATION_PAGE}"


def test_no_unknown_setting_documented(page: str) -> None:
    known = {setting.key for setting in SETTINGS}

    unknown = set(SETTING_NAME.findall(page)) - known

    assert not unknown, f"{CONFIGURATION_PAGE} names settings that do not exist: {unknown}"


def test_setting_rows_show_defaults(page: str) -> None:
    rows = table_rows(page)

    for setting in SETTINGS:
        assert setting.key in rows, f"{setting.key} has no row in the settings table"
        expected_default = "required" if setting.required else f"``{setting.default!r}``"
        assert expected_default in rows[setting.key], (
            f"the row of {setting.key} does not show the default {expected_default}"
        )


def test_every_task_option_documented(page: str) -> None:
    documented = set(TASK_OPTION_NAME.findall(page))

    for name in task_options():
        assert name in documented, f"TrackedTask.{name} is missing from {CONFIGURATION_PAGE}"


def test_no_unknown_task_option_documented(page: str) -> None:
    unknown = set(TASK_OPTION_NAME.findall(page)) - task_options()

    assert not unknown, f"{CONFIGURATION_PAGE} names task options that do not exist: {unknown}"


def test_task_option_rows_show_defaults(page: str) -> None:
    rows = table_rows(page)

    for name in task_options():
        assert name in rows, f"TrackedTask.{name} has no row in the task options table"
        default = getattr(TrackedTask, name)
        assert f"``{default!r}``" in rows[name], (
            f"the row of TrackedTask.{name} does not show the default {default!r}"
        )
