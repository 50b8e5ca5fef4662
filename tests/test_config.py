"""Settings: defaults, validation and masking of credentials."""

from __future__ import annotations

from typing import Any

import pytest
from celery.exceptions import ImproperlyConfigured

from celery_tasktracker.config import SETTINGS, TrackerConfig, mask_uri

URI = "mongodb://127.0.0.1:27017/app"


def test_defaults_apply_when_only_uri_set() -> None:
    config = TrackerConfig.from_mapping({"tasktracker_mongodb_uri": URI})

    assert config.collection == "task_tracker"
    assert config.duplicate_policy == "return_existing"
    assert config.dedup_window == 300.0
    assert config.retry_categories == ("transient", "timeout")
    assert config.renewal_interval == pytest.approx(config.lease / 3)


def test_missing_uri_names_setting() -> None:
    with pytest.raises(ImproperlyConfigured, match="tasktracker_mongodb_uri is not set"):
        TrackerConfig.from_mapping({})


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("tasktracker_mongodb_uri", "redis://127.0.0.1", "mongodb://"),
    ("tasktracker_duplicate_policy", "ignore", "'return_existing', 'raise'"),
    ("tasktracker_dedup_window", 0, "greater than 0"),
    ("tasktracker_lease", "60", "greater than 0"),
    ("tasktracker_dlq_enabled", "yes", "True or False"),
    ("tasktracker_retry_categories", "transient", "list of category names"),
    ("tasktracker_error_categories", {"ConnectionError": "transient"}, "dotted"),
    ("tasktracker_result_max_length", 1.5, "whole number"),
])
def test_invalid_value_names_setting_and_value(key: str, value: Any, fragment: str) -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        TrackerConfig.from_mapping({"tasktracker_mongodb_uri": URI, key: value})

    assert key in str(info.value)
    assert repr(value) in str(info.value)
    assert fragment in str(info.value)


def test_unknown_setting_is_rejected() -> None:
    with pytest.raises(ImproperlyConfigured, match="tasktracker_dedup_windw"):
        TrackerConfig.from_mapping({"tasktracker_mongodb_uri": URI,
                                    "tasktracker_dedup_windw": 10})


def test_invalid_uri_error_masks_password() -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        TrackerConfig.from_mapping({"tasktracker_mongodb_uri": "mongo://user:s3cret@db/x"})

    assert "s3cret" not in str(info.value)


def test_mask_uri_hides_password() -> None:
    masked = mask_uri("mongodb://app:s3cret@db1:27017,db2:27017/prod?authSource=admin")

    assert "s3cret" not in masked
    assert masked == "mongodb://app:***@db1:27017,db2:27017/prod?authSource=admin"
    assert mask_uri("mongodb://db1/prod") == "mongodb://db1/prod"


def test_every_setting_has_doc_and_valid_default() -> None:
    for setting in SETTINGS:
        assert setting.doc.endswith("."), setting.key
        if not setting.required:
            setting.parse(setting.default)


def test_misspelt_uri_named_before_missing_uri() -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        TrackerConfig.from_mapping({"tasktracker_mongo_uri": URI})

    assert "unknown setting 'tasktracker_mongo_uri'" in str(info.value)
    assert "did you mean 'tasktracker_mongodb_uri'?" in str(info.value)
