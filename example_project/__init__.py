"""Example applications that use celery_tasktracker."""
