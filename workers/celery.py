"""The Celery app. `celery -A workers worker -Q <queue>` starts a worker for those queues.

This module is imported by the web tier too (to send tasks by name), so it imports no model code.
"""

import os

from celery import Celery

import llmsite  # noqa: F401  (sets the OpenMP spin before any model code loads)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")

app = Celery("workers")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
