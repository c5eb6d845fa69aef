"""The workers' Celery app: `celery -A workers worker -Q <queue>` starts a worker for those queues.

The web tier sends tasks by name through its own app (llmsite/producer.py) and never imports this.
"""

import os

from celery import Celery

import llmsite  # noqa: F401  (sets the OpenMP spin before any model code loads)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")

app = Celery("workers")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
