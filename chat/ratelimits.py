"""Per-token limits (requests and tokens per minute), kept as sliding windows in Redis.

Every protocol goes through `admit` before any model work (predict over HTTP and WebSocket via
`services.prepare`, /v1 too), and a finished request adds its tokens with `record_tokens`. A
sliding window (a sorted set of timestamps) has no minute boundary at which a burst slips
through twice, and `Retry-After` is exact: when the oldest entry leaves the window.
"""

import math
import uuid

from chat import events
from llmsite import redis_outage
from llmsite.errors import RateLimited
from chat.models import ApiToken

WINDOW_SECONDS = 60

# Atomic check-and-count on the Redis server's clock, so web processes on several hosts agree.
# KEYS: requests zset, tokens zset. ARGV: window, requests limit, tokens limit (0 = none), member.
# Token entries are "<uuid>:<count>" members.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
if tpm > 0 then
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local used = 0
  for i = 1, #entries, 2 do used = used + tonumber(string.match(entries[i], ':(%d+)$')) end
  if used >= tpm then
    return {'tokens', tostring(tonumber(entries[2]) + window - now), tostring(used)}
  end
end
if rpm > 0 then
  local count = redis.call('ZCARD', KEYS[1])
  if count >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {'requests', tostring(tonumber(oldest[2]) + window - now), tostring(count)}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], window + 1)
return {'ok', '0', '0'}
"""

_RECORD = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]) + 1)
"""


def _keys(token_id) -> list[str]:
    return [f"llmsite:ratelimit:{token_id}:requests", f"llmsite:ratelimit:{token_id}:tokens"]


def is_limited(token: ApiToken) -> bool:
    return bool(token.requests_per_minute or token.tokens_per_minute)


def admit(*, token: ApiToken) -> None:
    """Count one request for `token`, or raise RateLimited (429) naming the limit and the wait."""
    if not is_limited(token):
        return
    keys, member = _keys(token.pk), uuid.uuid4().hex
    limits = (WINDOW_SECONDS, token.requests_per_minute or 0, token.tokens_per_minute or 0, member)
    # (a request's first write: one refused by a Redis that failed over is tried again)
    verdict, wait, used = redis_outage.again_if_failed_over(lambda: events.sync_client().eval(_ADMIT, 2, *keys, *limits))
    verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
    if verdict == "ok":
        return
    retry_after = max(1, math.ceil(float(wait)))
    if verdict == "requests":
        limit, what = token.requests_per_minute, "requests"
    else:
        limit, what = token.tokens_per_minute, "tokens"
    raise RateLimited(
        f"This token is limited to {limit} {what} per minute and has used {int(used)}: "
        f"retry after {retry_after} seconds.",
        retry_after=retry_after,
        reason="rate_limited" if verdict == "requests" else "quota",  # as /metrics counts it
    )


async def record_tokens(*, token: ApiToken, tokens: int) -> None:
    """Add a finished request's prompt and answer tokens to the token's tokens-per-minute window."""
    if not token.tokens_per_minute or tokens <= 0:
        return
    await events.async_client().eval(_RECORD, 1, _keys(token.pk)[1], WINDOW_SECONDS, f"{uuid.uuid4().hex}:{int(tokens)}")
