"""Request records and feedback verdicts on Redis: `index.feedback.FeedbackStore` for many replicas.

Keys, under one prefix whose `{...}` hash tag keeps them in one cluster slot:
- `req:<id>`: a hash (header JSON, vector, emb, frames: raw bytes), expiring with the record's TTL;
- `reqs`: zset of request ids by creation time, to keep at most `max_records` (oldest out);
- `fb:<id>`: a hash (verdict, sku, at, and the record's fields), expiring after the retention time;
- `fbs`: zset of verdict request ids by time given, for the export (members whose hash expired are
  pruned as they are met).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from index.errors import RequestNotFound
from index.feedback import Feedback, RequestRecord, pack_record, unpack_record
from index.redis_util import reachable

DEFAULT_FEEDBACK_PREFIX = "rice:{feedback}:"

# ARGV: prefix, id, created_at, ttl_ms, max_records, header, vector, emb, frames. Keeps the newest max_records.
_PUT_REQUEST = """
local p, id = ARGV[1], ARGV[2]
local k = p .. 'req:' .. id
redis.call('HSET', k, 'header', ARGV[6], 'vector', ARGV[7], 'emb', ARGV[8], 'frames', ARGV[9])
redis.call('PEXPIRE', k, ARGV[4])
redis.call('ZADD', p .. 'reqs', ARGV[3], id)
local extra = redis.call('ZCARD', p .. 'reqs') - tonumber(ARGV[5])
if extra > 0 then
  for _, old in ipairs(redis.call('ZPOPMIN', p .. 'reqs', extra)) do
    redis.call('DEL', p .. 'req:' .. old)
  end
end
return 1
"""

_RECORD_FIELDS = ("header", "vector", "emb", "frames")


class RedisFeedbackStore:
    """`index.feedback.FeedbackStore` on the deployment's Redis server."""

    def __init__(self, url: str, prefix: str = DEFAULT_FEEDBACK_PREFIX, max_records: int = 10_000, timeout_s: float = 5.0) -> None:
        self._r: Any = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self.prefix = prefix
        self.max_records = max_records
        self._put_request: Any = self._r.register_script(_PUT_REQUEST)

    def put_request(self, record: RequestRecord, ttl_s: float) -> None:
        header, vec, emb, jpegs = pack_record(record)
        ttl_ms = max(1, int(ttl_s * 1000))
        with reachable():
            args = [self.prefix, record.request_id, repr(record.created_at), ttl_ms, self.max_records, header, vec, emb, jpegs]
            self._put_request(args=args)

    def get_request(self, request_id: str, now: float) -> RequestRecord:
        with reachable():
            values = self._r.hmget(f"{self.prefix}req:{request_id}", _RECORD_FIELDS)
        if values[0] is None:  # Redis expired it (or the cap pushed it out)
            raise RequestNotFound(f"no request with id {request_id} (unknown, or expired)")
        return unpack_record(*values)

    def put_feedback(self, feedback: Feedback, retention_s: float) -> Feedback | None:
        header, vec, emb, jpegs = pack_record(feedback.record)
        key = f"{self.prefix}fb:{feedback.request_id}"
        fields: dict[str, str | bytes] = {"verdict": feedback.verdict, "sku": feedback.sku or "", "at": repr(feedback.at)}
        fields.update({"header": header, "vector": vec, "emb": emb, "frames": jpegs})
        with reachable():
            old = self._read_feedback(key)
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(key)
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, max(1, int(retention_s * 1000)))
            pipe.zadd(self.prefix + "fbs", {feedback.request_id: feedback.at})
            pipe.execute()
        return old

    def _read_feedback(self, key: str) -> Feedback | None:
        verdict, sku, at, *record = self._r.hmget(key, ("verdict", "sku", "at", *_RECORD_FIELDS))
        if verdict is None:
            return None
        r = unpack_record(*record)
        return Feedback(r.request_id, verdict.decode(), sku.decode() or None, float(at), r)

    def get_feedback(self, request_id: str, now: float) -> Feedback | None:
        with reachable():
            return self._read_feedback(f"{self.prefix}fb:{request_id}")

    def feedback_since(self, since: float, now: float) -> Iterator[Feedback]:
        with reachable():
            ids = [x.decode() for x in self._r.zrangebyscore(self.prefix + "fbs", repr(since), "+inf")]
        for request_id in ids:
            with reachable():
                fb = self._read_feedback(f"{self.prefix}fb:{request_id}")
                if fb is None:  # expired: its index entry goes too
                    self._r.zrem(self.prefix + "fbs", request_id)
            if fb is not None:
                yield fb

    def purge(self, now: float) -> int:
        """Redis expires the hashes itself; this drops index entries whose hash is gone."""
        gone = 0
        with reachable():
            for zset, kind in (("reqs", "req"), ("fbs", "fb")):
                ids = [x.decode() for x in self._r.zrange(self.prefix + zset, 0, -1)]
                pipe = self._r.pipeline(transaction=False)
                for request_id in ids:
                    pipe.exists(f"{self.prefix}{kind}:{request_id}")
                dead = [i for i, alive in zip(ids, pipe.execute(), strict=True) if not alive]
                if dead:
                    gone += int(self._r.zrem(self.prefix + zset, *dead))
        return gone

    def close(self) -> None:
        self._r.close()
