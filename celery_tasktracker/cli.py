"""The ``celery tasktracker`` command."""

from __future__ import annotations

import click
from celery.bin.base import CeleryCommand

__all__ = ["tasktracker"]


@click.group(cls=click.Group, name="tasktracker")
def tasktracker() -> None:
    """Inspect and operate the executions recorded by celery_tasktracker."""


_ = CeleryCommand
