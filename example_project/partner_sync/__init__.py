"""Partner flight log sync: a tracked Celery app that polls partners and syncs their logs."""
