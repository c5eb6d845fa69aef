"""Celery's Redis transport, whose connections take a Redis that is no longer the primary for one
that is away (llmsite.redis_outage). With kombu's own, a failover ends every worker: its
consumer's BRPOP on the old primary is answered with an error (UNBLOCKED where it was blocked,
READONLY after), which kombu counts as no connection error, and the worker stops ("Unrecoverable
error"). With these, the consumer reconnects, to the new primary.

Named by its module path (settings.CELERY_BROKER_TRANSPORT), it is not "rediss" to kombu, which
therefore does not turn TLS on by a `rediss://` URL's scheme alone: the settings do
(CELERY_BROKER_USE_SSL).
"""

import redis
from kombu.transport import redis as kombu_redis

from llmsite import redis_outage


class Channel(kombu_redis.Channel):
    # Not reconnected before a command: kombu watches each socket it reads (its BRPOP's) in a poller.
    connection_class = redis_outage.connection_class(redis.Connection, reconnect_first=False)
    connection_class_ssl = redis_outage.connection_class(redis.SSLConnection, reconnect_first=False)


class Transport(kombu_redis.Transport):
    Channel = Channel
