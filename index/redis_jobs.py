"""Timeline jobs on Redis: `index.jobs.JobStore` shared by every replica of a deployment.

Keys, under one prefix whose `{...}` hash tag keeps them in one cluster slot:
- `job:<id>`: a hash with the record's fields (JSON for params, result, error; "" for none);
- `queue`: zset of queued job ids by creation time (claim order);
- `leases`: zset of running job ids by lease expiry, so a job whose replica died (its lease ran
  out) is found with one range query and claimed again.
Every state change is one Lua script, so two replicas never claim the same job.
"""

from __future__ import annotations

import json
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from index.errors import JobNotFound
from index.jobs import JobRecord, JobStatus
from index.redis_util import reachable

DEFAULT_JOBS_PREFIX = "rice:{jobs}:"

# ARGV: prefix, owner, now, lease_s, max_attempts. Expired leases first (a dead replica's job),
# then the oldest queued job; a job claimed max_attempts times already is failed instead.
_CLAIM = """
local p, owner, now, lease, maxa = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
while true do
  local id
  local expired = redis.call('ZRANGEBYSCORE', p .. 'leases', '-inf', '(' .. ARGV[3], 'LIMIT', 0, 1)
  if #expired > 0 then
    id = expired[1]
    redis.call('ZREM', p .. 'leases', id)
  else
    local q = redis.call('ZRANGE', p .. 'queue', 0, 0)
    if #q == 0 then return false end
    id = q[1]
    redis.call('ZREM', p .. 'queue', id)
  end
  local k = p .. 'job:' .. id
  local attempts = tonumber(redis.call('HGET', k, 'attempts') or '0')
  if attempts >= maxa then
    redis.call('HSET', k, 'status', 'failed', 'owner', '', 'updated_at', ARGV[3],
      'error', cjson.encode({code = 'job_abandoned', message = 'the job stopped ' .. attempts ..
        ' times without finishing (its replica died each time)'}))
  else
    redis.call('HSET', k, 'status', 'running', 'owner', owner, 'lease_until', tostring(now + lease),
      'attempts', tostring(attempts + 1), 'progress', '0', 'updated_at', ARGV[3])
    redis.call('ZADD', p .. 'leases', now + lease, id)
    return id
  end
end
"""

# ARGV: prefix, id, owner, progress, now, lease_s
_HEARTBEAT = """
local p, id, owner = ARGV[1], ARGV[2], ARGV[3]
local k = p .. 'job:' .. id
if redis.call('HGET', k, 'status') ~= 'running' or redis.call('HGET', k, 'owner') ~= owner then return 0 end
local until_ = tonumber(ARGV[5]) + tonumber(ARGV[6])
redis.call('HSET', k, 'progress', ARGV[4], 'lease_until', tostring(until_), 'updated_at', ARGV[5])
redis.call('ZADD', p .. 'leases', until_, id)
return 1
"""

# ARGV: prefix, id, owner, status, now, result, error. Back to 'queued' re-enters the queue.
_FINISH = """
local p, id, owner, status = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local k = p .. 'job:' .. id
if redis.call('HGET', k, 'status') ~= 'running' or redis.call('HGET', k, 'owner') ~= owner then return 0 end
redis.call('HSET', k, 'status', status, 'owner', '', 'lease_until', '0', 'result', ARGV[6], 'error', ARGV[7], 'updated_at', ARGV[5])
if status == 'done' then redis.call('HSET', k, 'progress', '1') end
if status == 'queued' then
  redis.call('HSET', k, 'progress', '0')
  redis.call('ZADD', p .. 'queue', tonumber(redis.call('HGET', k, 'created_at')), id)
end
redis.call('ZREM', p .. 'leases', id)
return 1
"""

# ARGV: prefix, id, now
_CANCEL = """
local p, id = ARGV[1], ARGV[2]
local k = p .. 'job:' .. id
local status = redis.call('HGET', k, 'status')
if not status then return 0 end
if status == 'queued' or status == 'running' then
  redis.call('HSET', k, 'status', 'cancelled', 'owner', '', 'lease_until', '0', 'updated_at', ARGV[3])
  redis.call('ZREM', p .. 'queue', id)
  redis.call('ZREM', p .. 'leases', id)
end
return 1
"""


def _record(h: dict[bytes, bytes]) -> JobRecord:
    s = {k.decode(): v.decode() for k, v in h.items()}
    status: JobStatus = s["status"]  # type: ignore[assignment]
    return JobRecord(
        s["job_id"],
        status,
        float(s.get("progress") or 0),
        json.loads(s["params"]),
        s["upload_path"],
        float(s["created_at"]),
        float(s["updated_at"]),
        s.get("owner") or None,
        float(s.get("lease_until") or 0),
        int(s.get("attempts") or 0),
        json.loads(s["result"]) if s.get("result") else None,
        json.loads(s["error"]) if s.get("error") else None,
    )


class RedisJobStore:
    """`index.jobs.JobStore` on a Redis server (the one the gallery uses)."""

    def __init__(self, url: str, prefix: str = DEFAULT_JOBS_PREFIX, timeout_s: float = 5.0) -> None:
        # No automatic retries: a claim whose answer was lost must not be sent twice.
        self._r: Any = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self.prefix = prefix
        self._claim: Any = self._r.register_script(_CLAIM)
        self._heartbeat: Any = self._r.register_script(_HEARTBEAT)
        self._finish: Any = self._r.register_script(_FINISH)
        self._cancel: Any = self._r.register_script(_CANCEL)

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def create(self, job_id: str, params: dict[str, Any], upload_path: str, now: float) -> JobRecord:
        fields = {
            "job_id": job_id,
            "status": "queued",
            "progress": "0",
            "params": json.dumps(params),
            "upload_path": upload_path,
            "created_at": repr(now),
            "updated_at": repr(now),
            "owner": "",
            "lease_until": "0",
            "attempts": "0",
            "result": "",
            "error": "",
        }
        with reachable():
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(self._key(job_id), mapping=fields)
            pipe.zadd(self.prefix + "queue", {job_id: now})
            pipe.execute()
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with reachable():
            h = self._r.hgetall(self._key(job_id))
        if not h:
            raise JobNotFound(f"no job with id {job_id}")
        return _record(h)

    def claim(self, owner: str, lease_s: float, now: float, max_attempts: int) -> JobRecord | None:
        with reachable():
            job_id = self._claim(args=[self.prefix, owner, repr(now), repr(lease_s), max_attempts])
        return None if not job_id else self.get(job_id.decode())

    def heartbeat(self, job_id: str, owner: str, progress: float, lease_s: float, now: float) -> bool:
        with reachable():
            return bool(self._heartbeat(args=[self.prefix, job_id, owner, repr(progress), repr(now), repr(lease_s)]))

    def finish(
        self,
        job_id: str,
        owner: str,
        status: JobStatus,
        now: float,
        result: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
    ) -> bool:
        args = [
            self.prefix,
            job_id,
            owner,
            status,
            repr(now),
            json.dumps(result) if result is not None else "",
            json.dumps(error) if error else "",
        ]
        with reachable():
            return bool(self._finish(args=args))

    def cancel(self, job_id: str, now: float) -> JobRecord:
        with reachable():
            found = self._cancel(args=[self.prefix, job_id, repr(now)])
        if not found:
            raise JobNotFound(f"no job with id {job_id}")
        return self.get(job_id)

    def close(self) -> None:
        self._r.close()
