"""Fair turns between users: each deployment's waiting line, kept in Redis so every web process
and every worker sees the same one.

The web tier puts a request in its user's line (`enqueue`; 429 beyond `max_waiting_per_user`
waiting); a worker with room in its engine asks for the next request (`next_request`) and only
then starts it, so no worker holds waiting work another could start. The next one goes to the
user with the fewest requests running (ties: round robin), so a user with nothing running goes
ahead of the second to fortieth waiting requests of a user who already has some running. The
user at the head of the round has waited longest: after as many passes over it as there are
users in the round, it goes next whatever it runs, so every waiting request starts in the end.
No running answer is ever paused.

Keys, per deployment (`prefix`): `:q:<user>` that user's waiting ids, `:ring` the users with
waiting requests in round-robin order, `:body` id -> the GenerationRequest's wire JSON, `:who`
id -> user of a waiting request, `:running` id -> user of a started one, `:runs` user -> count
started, `:pos` id -> the last position told, `:cap` the engine room per worker, `:avg` the mean
seconds of an answer. Each step is one Lua script, so no two callers see a half-done line.
"""

import json

from llmsite.workers_alive import sync_client

BELL_PREFIX = "llmsite:admission:bell:"  # one per queue: a worker's wake-up when something is queued

_ENQUEUE = """
local p, user, rid = ARGV[1], ARGV[2], ARGV[3]
local q = p .. ':q:' .. user
if redis.call('LLEN', q) >= tonumber(ARGV[5]) then return -1 end
if redis.call('RPUSH', q, rid) == 1 then redis.call('RPUSH', p .. ':ring', user) end
redis.call('HSET', p .. ':body', rid, ARGV[4])
redis.call('HSET', p .. ':who', rid, user)
redis.call('SET', p .. ':cap', ARGV[6])
redis.call('SADD', KEYS[2], ARGV[7])
redis.call('LPUSH', KEYS[1], 1)
redis.call('LTRIM', KEYS[1], 0, 63)
return redis.call('HLEN', p .. ':body')
"""

# ARGV: prefix, this worker's running count. Returns {id, body} or nil.
_NEXT = """
local p = ARGV[1]
local cap = tonumber(redis.call('GET', p .. ':cap') or '0')
if tonumber(ARGV[2]) >= cap then return nil end
local ring = redis.call('LRANGE', p .. ':ring', 0, -1)
if #ring == 0 then return nil end
local best, fewest = nil, nil
for _, u in ipairs(ring) do
  local n = tonumber(redis.call('HGET', p .. ':runs', u) or '0')
  if fewest == nil or n < fewest then best, fewest = u, n end
end
if best ~= ring[1] and redis.call('INCR', p .. ':skips') > #ring then best = ring[1] end
if best == ring[1] then redis.call('DEL', p .. ':skips') end
redis.call('LREM', p .. ':ring', 1, best)
local q = p .. ':q:' .. best
local rid = redis.call('LPOP', q)
if redis.call('LLEN', q) > 0 then redis.call('RPUSH', p .. ':ring', best) end
local body = redis.call('HGET', p .. ':body', rid)
redis.call('HDEL', p .. ':body', rid)
redis.call('HDEL', p .. ':who', rid)
redis.call('HDEL', p .. ':pos', rid)
redis.call('HSET', p .. ':running', rid, best)
redis.call('HINCRBY', p .. ':runs', best, 1)
return {rid, body}
"""

# ARGV: prefix, id, seconds it ran (or ''). Returns 1: it had started; 2: it left the line; 0: neither.
_DONE = """
local p, rid = ARGV[1], ARGV[2]
if ARGV[3] ~= '' then
  local avg = tonumber(redis.call('GET', p .. ':avg') or ARGV[3])
  redis.call('SET', p .. ':avg', 0.8 * avg + 0.2 * tonumber(ARGV[3]))
end
local user = redis.call('HGET', p .. ':running', rid)
if user then
  redis.call('HDEL', p .. ':running', rid)
  if redis.call('HINCRBY', p .. ':runs', user, -1) <= 0 then redis.call('HDEL', p .. ':runs', user) end
  return 1
end
user = redis.call('HGET', p .. ':who', rid)
if not user then return 0 end
local q = p .. ':q:' .. user
redis.call('LREM', q, 1, rid)
if redis.call('LLEN', q) == 0 then redis.call('LREM', p .. ':ring', 1, user) end
redis.call('HDEL', p .. ':body', rid)
redis.call('HDEL', p .. ':who', rid)
redis.call('HDEL', p .. ':pos', rid)
return 2
"""

# The waiting ids in the order they would start if nothing else came (the same rule as _NEXT);
# returns {running, avg, id1, pos1, ...} for the ids whose position went down since last told (all
# of them with ARGV[2] = '1': a reminder that keeps a long wait from looking like a silent worker).
_LINE = """
local p = ARGV[1]
local ring = redis.call('LRANGE', p .. ':ring', 0, -1)
local runs, lines, told = {}, {}, {}
for _, u in ipairs(ring) do
  runs[u] = tonumber(redis.call('HGET', p .. ':runs', u) or '0')
  lines[u] = redis.call('LRANGE', p .. ':q:' .. u, 0, -1)
end
local out = {redis.call('HLEN', p .. ':running'), redis.call('GET', p .. ':avg') or ''}
local position = 0
while #ring > 0 do
  local best, at = nil, nil
  for i, u in ipairs(ring) do
    if best == nil or runs[u] < runs[best] then best, at = u, i end
  end
  table.remove(ring, at)
  local rid = table.remove(lines[best], 1)
  if #lines[best] > 0 then table.insert(ring, best) end
  runs[best] = runs[best] + 1
  local last = tonumber(redis.call('HGET', p .. ':pos', rid) or '-1')
  if last < 0 or position < last or ARGV[2] == '1' then
    redis.call('HSET', p .. ':pos', rid, position)
    table.insert(out, rid)
    table.insert(out, position)
  end
  position = position + 1
end
return out
"""


def prefix(deployment: str) -> str:
    return f"llmsite:admission:{deployment}"


def bell(queue: str) -> str:
    return BELL_PREFIX + queue


def served_key(queue: str) -> str:
    """The deployments of `queue` that ever had a waiting line: what its workers ask for."""
    return f"llmsite:admission:deployments:{queue}"


def deployments_of(queues) -> set[str]:
    client = sync_client()
    return {name.decode() for queue in queues for name in client.smembers(served_key(queue))}


def waiting_of(deployment: str, user: str) -> int:
    return int(sync_client().llen(f"{prefix(deployment)}:q:{user}"))


def user_key(user_id) -> str:
    """Whose turn a request takes: its user's (an API token counts as its user)."""
    return f"u{user_id}"


def enqueue(*, deployment: str, queue: str, user: str, request_id: str, body: dict, max_waiting: int, capacity: int) -> bool:
    """Put the request in its user's line; False when that user has `max_waiting` waiting already."""
    found = sync_client().eval(
        _ENQUEUE, 2, bell(queue), served_key(queue), prefix(deployment), user, request_id, json.dumps(body), max_waiting, capacity, deployment
    )
    return int(found) >= 0


def next_request(*, deployment: str, running_here: int) -> tuple[str, dict] | None:
    """The next request to start on a worker that runs `running_here` of this deployment's now, or None."""
    found = sync_client().eval(_NEXT, 0, prefix(deployment), running_here)
    if not found:
        return None
    request_id, body = found
    return request_id.decode(), json.loads(body)


def done(*, deployment: str, request_id: str, seconds: float | None = None) -> int:
    """The request ended or was withdrawn: 1 if it had started, 2 if it left the line, 0 neither."""
    return int(sync_client().eval(_DONE, 0, prefix(deployment), request_id, "" if seconds is None else f"{seconds:.3f}"))


def line_moves(deployment: str, *, everyone: bool = False) -> list[tuple[str, int, float | None]]:
    """(id, position, estimated seconds) for each waiting request whose place improved since it
    was last told (a newcomer that goes ahead never makes a told position grow); `everyone`: for
    every waiting request."""
    found = sync_client().eval(_LINE, 0, prefix(deployment), "1" if everyone else "0")
    running, avg = int(found[0]), float(found[1]) if found[1] else None
    moves = []
    for rid, position in zip(found[2::2], found[3::2]):
        wait = None if avg is None else round(avg * (int(position) // max(running, 1) + 1), 1)
        moves.append((rid.decode(), int(position), wait))
    return moves


def started(deployment: str) -> list[str]:
    """The ids counted as running: a worker took them, and nobody has said `done` for them yet."""
    return [rid.decode() for rid in sync_client().hkeys(f"{prefix(deployment)}:running")]


def waiting_among(deployments, request_ids: list[str]) -> set[str]:
    """Those of `request_ids` that wait in the line of one of `deployments`."""
    pipe = sync_client().pipeline(transaction=False)
    for deployment in deployments:
        for request_id in request_ids:
            pipe.hexists(f"{prefix(deployment)}:body", request_id)
    found = pipe.execute()
    return {request_id for i, request_id in enumerate(request_ids) if any(found[i :: len(request_ids)])}


def has_waiting(deployment: str) -> bool:
    return bool(sync_client().exists(prefix(deployment) + ":ring"))
