"""Model workers: the Celery app (`celery -A workers worker -Q <queue>`), tasks and engines."""

from workers.celery import app

__all__ = ["app"]
