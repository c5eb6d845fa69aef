"""Whether a live worker consumes a queue, read from the Redis keys that workers' heartbeats renew
(workers/heartbeat.py), for code that may import neither chat/ nor workers/ (`manage.py ingest`).

The key names live here so every reader and the writer agree on them.
"""

import redis
from django.conf import settings

from llmsite import redis_outage

_client = None


def queue_alive_key(queue: str) -> str:
    """Renewed by every worker of the queue on each heartbeat: it expires with the last one's."""
    return f"llmsite:queue-alive:{queue}"


def worker_host_key(hostname: str) -> str:
    return f"llmsite:workerhost:{hostname}"


def sync_client() -> redis.Redis:
    """The process's one synchronous Redis client (chat.events uses it too)."""
    global _client
    if _client is None:
        # A connect that hangs (a host that went away without refusing) fails after 5 s, as a refused one does at once.
        # Its connections take a Redis that is no longer the primary for one that is away (llmsite.redis_outage).
        client = redis.Redis.from_url(settings.REDIS_URL, health_check_interval=30, socket_connect_timeout=5)
        redis_outage.on_the_primary(client.connection_pool)
        _client = client
    return _client


def queue_has_worker(queue: str) -> bool:
    """Whether some worker beat for `queue` within the last WORKER_HEARTBEAT_TTL seconds."""
    return bool(sync_client().exists(queue_alive_key(queue)))  # one key: O(1) however many keys Redis holds
