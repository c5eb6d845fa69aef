from celery import shared_task

from workers import loader  # noqa: F401  (connects the model-loading signal)
from workers import services


@shared_task(name="workers.generate", ignore_result=True)
def generate(*, request_id: str, deployment: str, messages: list, params: dict) -> None:
    """Generate one answer; at most once (acknowledged on start, never retried)."""
    services.run_generation(request_id=request_id, deployment=deployment, messages=messages, params=params)


@shared_task(name="workers.embed", ignore_result=True)
def embed(*, request_id: str, texts: list) -> None:
    """Embed texts for a waiting web request; the vectors go back on the request's stream."""
    services.run_embedding(request_id=request_id, texts=texts)
