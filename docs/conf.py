"""Sphinx configuration of the celery-tasktracker documentation."""

from __future__ import annotations

import re
from pathlib import Path

# Read the version from the package source instead of importing the package;
# only the API page imports it, through autodoc.
_INIT = Path(__file__).resolve().parent.parent / "celery_tasktracker" / "__init__.py"
_VERSION = re.search(r'^__version__ = "([^"]+)"', _INIT.read_text(encoding="utf-8"), re.M)

project = "celery-tasktracker"
author = "celery-tasktracker contributors"
copyright = "celery-tasktracker contributors"
release = _VERSION.group(1) if _VERSION else "unknown"
version = release

extensions: list[str] = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"

root_doc = "index"
exclude_patterns = ["_build"]
highlight_language = "python"
pygments_style = "sphinx"

html_theme = "alabaster"
html_title = f"celery-tasktracker {release}"
html_theme_options = {
    "description": "Task ids, deduplication, idempotent execution and a DLQ for Celery",
    "fixed_sidebar": True,
}
