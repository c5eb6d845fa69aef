"""Celery's Redis transport, whose connections take a Redis that is no longer the primary for one
that is away (llmsite.redis_outage). With kombu's own, a failover ends every worker: the blocked
BRPOP of its consumer is answered READONLY, which kombu counts as no connection error, and the
worker stops ("Unrecoverable error"). With these, the consumer reconnects, to the new primary.
"""

from kombu.transport import redis as kombu_redis

from llmsite import redis_outage


class Channel(kombu_redis.Channel):
    # Not reconnected before a command: kombu watches each socket it reads (its BRPOP's) in a poller.
    connection_class = redis_outage.connection_class("redis://", reconnect_first=False)
    connection_class_ssl = redis_outage.connection_class("rediss://", reconnect_first=False)


class Transport(kombu_redis.Transport):
    Channel = Channel
