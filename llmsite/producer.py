"""The web tier's side of the queue: tasks sent to the workers by name, with no worker code
imported (the worker's own app is workers/celery.py, for `celery -A workers worker`)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")

GENERATE_TASK = "workers.generate"
EMBED_TASK = "workers.embed"
INGEST_TASK = "workers.ingest_document"

app = Celery("llmsite")
app.config_from_object("django.conf:settings", namespace="CELERY")


def send(name: str, *, queue: str, kwargs: dict, task_id: str | None = None, kwargsrepr: str | None = None) -> None:
    """Queue task `name` on `queue`; `kwargsrepr` is what the message's headers and the worker's
    log show instead of the arguments (a request's whole text need not be written there)."""
    app.send_task(name, task_id=task_id, queue=queue, kwargs=kwargs, kwargsrepr=kwargsrepr)
