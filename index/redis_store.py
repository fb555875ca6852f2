"""Shared gallery store on Redis: the current state in hashes plus an append-only stream of mutations.

Behaves like `SQLiteStore` (same versions, tombstones, namespaces, errors) but many service
processes share it: each boots from the state (`snapshot`) and then follows the stream
(`read_log`). This is the only module that talks to Redis.

Keys, all under one prefix whose `{...}` hash tag keeps them in one cluster slot:

- `version`: the gallery version counter (INCR), `epoch`: a random id written once; it is
  missing or different after the server lost its data, which tells followers to resync.
- `log`: the stream; entry id `<version>-0`, one entry per version, fields op, v, t (writer's
  clock), ns, items (JSON), dim, vecs (raw little-endian float32 bytes, items x dim).
- per namespace `n:<ns>:hdr` (item -> JSON header: sku, shop_id, dim, metadata as a string),
  `n:<ns>:vec` (item -> raw float32 bytes; absent = tombstone), `n:<ns>:ver` (zset item ->
  version, for changes_since), and `namespaces` (the set of them).
- `thumbs`: item id -> catalog thumbnail (JPEG bytes), shared by every namespace's copy of the item.
- `feats`: item id -> local features (`pipeline.local_features` bytes, at most 40 KB), shared likewise.
- `sku:<sku>`: live members (`<len(ns)>:<ns><item_id>`) of a SKU, for delete_sku.

Every mutation is one Lua script (atomic, replicated and AOF-logged as a unit): it checks what
it must, then INCRs the version, updates the state and appends the stream entry, so versions
are contiguous in the stream (a gap means entries were trimmed away). A call returns only
after Redis executed the script, i.e. after the AOF write when appendfsync is `always`.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from index.errors import ItemNotFound, StoreUnavailable
from index.records import LogEntry, Record, Snapshot, metadata_to_json, vector_to_bytes
from index.redis_util import reachable

DEFAULT_PREFIX = "rice:{gallery}:"
_CHUNK = 1000  # items per round trip when reading the state
_LAST_PART = 2**64 - 1  # the largest stream-id sequence: reading after `<v>-_LAST_PART` skips all of v's parts
_STAGE_TTL_S = 3600  # staged parts of an import that never committed (its writer died) expire

# Shared by every write script: stream entries with the version as id (so a gap in ids means entries
# were trimmed), part 0 of each version's id being `<v>-0` (a bulk import writes parts 0..n-1 of one
# version), the stream capped at about `maxlen` entries (0 = all).
_APPEND_LOG = """
local function append_log(p, maxlen, v, fields, part)
  local xadd = {'XADD', p .. 'log'}
  if tonumber(maxlen) > 0 then
    table.insert(xadd, 'MAXLEN'); table.insert(xadd, '~'); table.insert(xadd, maxlen)
  end
  table.insert(xadd, v .. '-' .. (part or 0))
  for _, x in ipairs(fields) do table.insert(xadd, x) end
  redis.call(unpack(xadd))
end
"""

# Shared by both delete scripts: tombstone the given (namespace, item) pairs under one new version.
_TOMBSTONE = (
    _APPEND_LOG
    + """
local function tombstone(p, epoch, maxlen, t, hits, ids)
  if #hits == 0 then return {0} end
  redis.call('SET', p .. 'epoch', epoch, 'NX')
  local v = redis.call('INCR', p .. 'version')
  for _, h in ipairs(hits) do
    local ns, id = h[1], h[2]
    local sku = cjson.decode(redis.call('HGET', p .. 'n:' .. ns .. ':hdr', id)).sku
    redis.call('HDEL', p .. 'n:' .. ns .. ':vec', id)
    redis.call('ZADD', p .. 'n:' .. ns .. ':ver', v, id)
    redis.call('SREM', p .. 'sku:' .. sku, #ns .. ':' .. ns .. id)
  end
  append_log(p, maxlen, v, {'op', 'delete', 'v', tostring(v), 't', t, 'items', cjson.encode(ids)})
  local out = {v}
  for _, id in ipairs(ids) do table.insert(out, id) end
  return out
end
"""
)

# ARGV: prefix, namespace, epoch, maxlen, t, dim, items JSON, vecs bytes, n, then n x (item_id, sku, header).
_UPSERT = (
    _APPEND_LOG
    + """
local p, ns, epoch, maxlen, t, dim, items, vecs = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local n = tonumber(ARGV[9])
local width = tonumber(dim) * 4
redis.call('SET', p .. 'epoch', epoch, 'NX')
local v = redis.call('INCR', p .. 'version')
redis.call('SADD', p .. 'namespaces', ns)
local hdr, vec, ver = p .. 'n:' .. ns .. ':hdr', p .. 'n:' .. ns .. ':vec', p .. 'n:' .. ns .. ':ver'
for i = 0, n - 1 do
  local b = 10 + i * 3
  local id, sku, h = ARGV[b], ARGV[b + 1], ARGV[b + 2]
  local member = #ns .. ':' .. ns .. id
  if redis.call('HEXISTS', vec, id) == 1 then
    local old = cjson.decode(redis.call('HGET', hdr, id)).sku
    if old ~= sku then redis.call('SREM', p .. 'sku:' .. old, member) end
  end
  redis.call('HSET', hdr, id, h)
  redis.call('HSET', vec, id, string.sub(vecs, i * width + 1, (i + 1) * width))
  redis.call('ZADD', ver, v, id)
  redis.call('SADD', p .. 'sku:' .. sku, member)
end
append_log(p, maxlen, v, {'op', 'upsert', 'v', tostring(v), 't', t, 'ns', ns, 'items', items, 'dim', dim, 'vecs', vecs})
return v
"""
)

# A bulk import: its rows were staged (invisible to readers) in keys `<stage><i>:hdrs` (JSON
# [[item_id, sku, header], ...]), `<stage><i>:items` (the log's items JSON) and `<stage><i>:vecs`
# (raw float32), i = 0..n-1. This script checks every part is there, then writes them all under one
# version, one stream entry per part (ids <v>-0 .. <v>-(n-1), fields part and parts): atomic, and
# no single value exceeds Redis's bulk-string limit.
# ARGV: prefix, namespace, epoch, maxlen, t, dim, stage, n
_COMMIT_STAGED = (
    _APPEND_LOG
    + """
local p, ns, epoch, maxlen, t, dim, stage = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local n = tonumber(ARGV[8])
local width = tonumber(dim) * 4
for c = 0, n - 1 do
  for _, part in ipairs({':hdrs', ':items', ':vecs'}) do
    if redis.call('EXISTS', stage .. c .. part) == 0 then
      return redis.error_reply('staged bulk import is incomplete or expired: ' .. stage .. c .. part)
    end
  end
end
redis.call('SET', p .. 'epoch', epoch, 'NX')
local v = redis.call('INCR', p .. 'version')
redis.call('SADD', p .. 'namespaces', ns)
local hdr, vec, ver = p .. 'n:' .. ns .. ':hdr', p .. 'n:' .. ns .. ':vec', p .. 'n:' .. ns .. ':ver'
for c = 0, n - 1 do
  local rows = cjson.decode(redis.call('GET', stage .. c .. ':hdrs'))
  local items = redis.call('GET', stage .. c .. ':items')
  local vecs = redis.call('GET', stage .. c .. ':vecs')
  for i, row in ipairs(rows) do
    local id, sku, h = row[1], row[2], row[3]
    local member = #ns .. ':' .. ns .. id
    if redis.call('HEXISTS', vec, id) == 1 then
      local old = cjson.decode(redis.call('HGET', hdr, id)).sku
      if old ~= sku then redis.call('SREM', p .. 'sku:' .. old, member) end
    end
    redis.call('HSET', hdr, id, h)
    redis.call('HSET', vec, id, string.sub(vecs, (i - 1) * width + 1, i * width))
    redis.call('ZADD', ver, v, id)
    redis.call('SADD', p .. 'sku:' .. sku, member)
  end
  append_log(p, maxlen, v, {'op', 'upsert', 'v', tostring(v), 't', t, 'ns', ns, 'items', items, 'dim', dim, 'vecs', vecs,
    'part', tostring(c), 'parts', tostring(n)}, c)
  redis.call('DEL', stage .. c .. ':hdrs', stage .. c .. ':items', stage .. c .. ':vecs')
end
return v
"""
)

# ARGV: prefix, epoch, maxlen, t, item ids...
_DELETE_ITEMS = (
    _TOMBSTONE
    + """
local p = ARGV[1]
local nss = redis.call('SMEMBERS', p .. 'namespaces')
local hits, ids, seen = {}, {}, {}
for i = 5, #ARGV do
  local id = ARGV[i]
  for _, ns in ipairs(nss) do
    if not seen[ns .. '\\0' .. id] and redis.call('HEXISTS', p .. 'n:' .. ns .. ':vec', id) == 1 then
      seen[ns .. '\\0' .. id] = true
      table.insert(hits, {ns, id})
      if not seen[id] then seen[id] = true; table.insert(ids, id) end
    end
  end
end
return tombstone(p, ARGV[2], ARGV[3], ARGV[4], hits, ids)
"""
)

# ARGV: prefix, epoch, maxlen, t, sku, has_shop ('0'/'1'), shop
_DELETE_SKU = (
    _TOMBSTONE
    + """
local p, sku, has_shop, shop = ARGV[1], ARGV[5], ARGV[6], ARGV[7]
local hits, ids, seen = {}, {}, {}
for _, m in ipairs(redis.call('SMEMBERS', p .. 'sku:' .. sku)) do
  local colon = string.find(m, ':', 1, true)
  local len = tonumber(string.sub(m, 1, colon - 1))
  local ns, id = string.sub(m, colon + 1, colon + len), string.sub(m, colon + len + 1)
  local ok = has_shop == '0'
  if not ok then
    ok = cjson.decode(redis.call('HGET', p .. 'n:' .. ns .. ':hdr', id)).shop_id == shop
  end
  if ok then
    table.insert(hits, {ns, id})
    if not seen[id] then seen[id] = true; table.insert(ids, id) end
  end
end
return tombstone(p, ARGV[2], ARGV[3], ARGV[4], hits, ids)
"""
)


class RedisStore:
    """`index.records.Store` and `index.records.ChangeLog` on a Redis server."""

    def __init__(
        self, url: str, prefix: str = DEFAULT_PREFIX, log_maxlen: int = 100_000, timeout_s: float = 5.0, part_rows: int = 4096
    ) -> None:
        """`log_maxlen` bounds the stream (approximately; 0 = unbounded): a follower further behind resyncs.
        `part_rows`: an upsert of more records is staged in parts of this many and committed by one script."""
        # No automatic retries: re-sending a write whose answer was lost could apply it twice.
        # Typed as Any: redis-py's stubs type every reply as a union of everything a reply can be.
        self._r: Any = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0), health_check_interval=30
        )
        self._timeout_s = timeout_s
        self.prefix = prefix
        self.log_maxlen = log_maxlen
        self._upsert: Any = self._r.register_script(_UPSERT)
        self._delete_items: Any = self._r.register_script(_DELETE_ITEMS)
        self._delete_sku: Any = self._r.register_script(_DELETE_SKU)
        self._commit_staged: Any = self._r.register_script(_COMMIT_STAGED)
        self.part_rows = max(1, part_rows)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- Store ---------------------------------------------------------------------------------

    def upsert(self, namespace: str, records: list[Record]) -> int:
        """Store records (vectors required, one dimension per call); returns the new gallery version."""
        dims = set()
        for r in records:
            if r.vector is None:
                raise ValueError("upsert needs a vector for every record")
            dims.add(int(np.asarray(r.vector).reshape(-1).shape[0]))
        if len(dims) > 1:
            raise ValueError(f"one upsert holds vectors of one dimension, got {sorted(dims)}")
        dim = dims.pop() if dims else 0
        if len(records) > self.part_rows:
            return self._upsert_staged(namespace, records, dim)
        items, args = [], []
        for r in records:
            meta = metadata_to_json(r.metadata)
            items.append(_log_item(r, meta))
            args += [r.item_id, r.sku, _header(r, dim, meta)]
        vecs = b"".join(vector_to_bytes(np.asarray(r.vector).reshape(-1)) for r in records)
        head = [self.prefix, namespace, uuid.uuid4().hex, self.log_maxlen, repr(time.time()), dim, json.dumps(items), vecs, len(records)]
        with reachable():
            return int(self._upsert(args=head + args))

    def _upsert_staged(self, namespace: str, records: list[Record], dim: int) -> int:
        """A large upsert, still all or nothing: stage it in parts (invisible to every reader), then
        one script checks the parts and writes them under one version. A failure before the commit
        leaves only staged keys, which expire; readers never see part of the import."""
        stage = self._key("stage", uuid.uuid4().hex, "")
        parts = range(0, len(records), self.part_rows)
        with reachable():
            try:
                for i, start in enumerate(parts):
                    chunk = records[start : start + self.part_rows]
                    hdrs, items = [], []
                    for r in chunk:
                        meta = metadata_to_json(r.metadata)
                        hdrs.append([r.item_id, r.sku, _header(r, dim, meta)])
                        items.append(_log_item(r, meta))
                    vecs = b"".join(vector_to_bytes(np.asarray(r.vector).reshape(-1)) for r in chunk)
                    pipe = self._r.pipeline(transaction=False)
                    pipe.set(f"{stage}{i}:hdrs", json.dumps(hdrs), ex=_STAGE_TTL_S)
                    pipe.set(f"{stage}{i}:items", json.dumps(items), ex=_STAGE_TTL_S)
                    pipe.set(f"{stage}{i}:vecs", vecs, ex=_STAGE_TTL_S)
                    pipe.execute()
                head = [self.prefix, namespace, uuid.uuid4().hex, self.log_maxlen, repr(time.time()), dim, stage, len(parts)]
                return int(self._commit_staged(args=head))
            except BaseException:
                self._drop_stage(stage, len(parts))
                raise

    def _drop_stage(self, stage: str, parts: int) -> None:
        with contextlib.suppress(redis.exceptions.RedisError):  # unreachable: the keys expire on their own
            self._r.delete(*(f"{stage}{i}:{k}" for i in range(parts) for k in ("hdrs", "items", "vecs")))

    def _tombstoned(self, reply: list[Any], what: str) -> tuple[int, list[str]]:
        version = int(reply[0])
        if version == 0:
            raise ItemNotFound(what)
        return version, sorted(x.decode() for x in reply[1:])

    def delete_items(self, item_ids: list[str]) -> tuple[int, list[str]]:
        """Tombstone live items in every namespace; raises ItemNotFound if none were live."""
        what = f"no item with id {', '.join(item_ids)}"
        if not item_ids:
            raise ItemNotFound(what)
        with reachable():
            reply = self._delete_items(args=[self.prefix, uuid.uuid4().hex, self.log_maxlen, repr(time.time()), *item_ids])
        return self._tombstoned(reply, what)

    def delete_sku(self, sku: str, shop_id: str | None = None) -> tuple[int, list[str]]:
        """Tombstone every live item of a SKU (in one shop if given); raises ItemNotFound if none."""
        what = f"no items with sku {sku!r}" + ("" if shop_id is None else f" in shop {shop_id!r}")
        args = [self.prefix, uuid.uuid4().hex, self.log_maxlen, repr(time.time()), sku, "0" if shop_id is None else "1", shop_id or ""]
        with reachable():
            reply = self._delete_sku(args=args)
        return self._tombstoned(reply, what)

    def changes_since(self, namespace: str, version: int) -> list[Record]:
        """Records and tombstones of a namespace with version > `version`, in version order."""
        out = [r for chunk in self._read_since(namespace, version) for r in chunk]
        out.sort(key=lambda r: r.version)  # stable: a chunk read later may hold newer versions
        return [r for r in out if r.version > version]

    def _read_since(self, namespace: str, version: int) -> Iterator[list[Record]]:
        """The records (and tombstones) of items changed after `version`, `_CHUNK` at a time, in no order."""
        hdr, vec, ver = self._key("n", namespace, "hdr"), self._key("n", namespace, "vec"), self._key("n", namespace, "ver")
        with reachable():
            ids = [x.decode() for x in self._r.zrangebyscore(ver, f"({version}", "+inf")]
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            with reachable():
                # One MULTI per chunk: header, vector and version of each item are read together.
                pipe = self._r.pipeline(transaction=True)
                pipe.hmget(hdr, chunk)
                pipe.hmget(vec, chunk)
                pipe.zmscore(ver, chunk)
                headers, vectors, versions = pipe.execute()
            yield [_record(item_id, json.loads(h), x, int(v)) for item_id, h, x, v in zip(chunk, headers, vectors, versions, strict=True)]

    def put_thumbnail(self, item_id: str, jpeg: bytes) -> None:
        """Store (or replace) an item's thumbnail; every replica reads it from here."""
        with reachable():
            self._r.hset(self._key("thumbs"), item_id, jpeg)

    def thumbnail(self, item_id: str) -> bytes | None:
        """An item's thumbnail, or None."""
        with reachable():
            data = self._r.hget(self._key("thumbs"), item_id)
        return None if data is None else bytes(data)

    def delete_thumbnails(self, item_ids: list[str]) -> None:
        """Remove thumbnails of items that no namespace holds live any more."""
        with reachable():
            nss = [x.decode() for x in self._r.smembers(self._key("namespaces"))]
            for item_id in item_ids:
                if not any(self._r.hexists(self._key("n", ns, "vec"), item_id) for ns in nss):
                    self._r.hdel(self._key("thumbs"), item_id)

    def put_features(self, item_id: str, data: bytes) -> None:
        """Store (or replace) an item's local features; every replica reads them from here."""
        with reachable():
            self._r.hset(self._key("feats"), item_id, data)

    def features(self, item_ids: list[str]) -> dict[str, bytes]:
        """The features of those items that have some: one HMGET."""
        if not item_ids:
            return {}
        with reachable():
            values = self._r.hmget(self._key("feats"), item_ids)
        return {i: bytes(v) for i, v in zip(item_ids, values, strict=True) if v is not None}

    def delete_features(self, item_ids: list[str]) -> None:
        """Remove features of items that no namespace holds live any more."""
        with reachable():
            nss = [x.decode() for x in self._r.smembers(self._key("namespaces"))]
            for item_id in item_ids:
                if not any(self._r.hexists(self._key("n", ns, "vec"), item_id) for ns in nss):
                    self._r.hdel(self._key("feats"), item_id)

    def namespace_counts(self) -> dict[str, int]:
        """Live items per namespace (HLEN of each vector hash: O(1) each)."""
        with reachable():
            nss = sorted(x.decode() for x in self._r.smembers(self._key("namespaces")))
            return {ns: int(self._r.hlen(self._key("n", ns, "vec"))) for ns in nss}

    def version(self) -> int:
        """The latest gallery version written."""
        return self.position()[1]

    def close(self) -> None:
        """Close the connection pool."""
        self._r.close()

    # -- ChangeLog -----------------------------------------------------------------------------

    def position(self) -> tuple[str | None, int]:
        """(epoch, latest version); the epoch is None on a server that has no gallery data."""
        with reachable():
            epoch, version = self._r.mget([self._key("epoch"), self._key("version")])
        return (epoch.decode() if epoch is not None else None), int(version or 0)

    def snapshot(self, namespace: str) -> Snapshot:
        """The live records of a namespace, plus the (epoch, version) to follow the log from.

        The records are read after the version, in several round trips, so they may show some
        writes newer than `version` (and not others): a reader must claim exactly `version`
        (not the newest record's) and replay the log from it, which re-applies those writes.
        They are read lazily, `_CHUNK` at a time as the caller iterates (a replica's boot at a
        million items: a few MB of records in flight, not 5 GB of float32 vectors at once)."""
        with reachable():
            self._r.set(self._key("epoch"), uuid.uuid4().hex, nx=True)  # an empty server gets its epoch now
        epoch, version = self.position()
        assert epoch is not None
        live = (r for chunk in self._read_since(namespace, 0) for r in chunk if not r.deleted)
        return Snapshot(epoch, version, live)

    def read_log(self, namespace: str, after_version: int, block_ms: int, count: int) -> list[LogEntry]:
        """Log entries after `after_version`, oldest first, waiting up to `block_ms` (0 = not at all)."""
        log_key = self._key("log")
        with reachable():
            reply = self._r.xread({log_key: f"{after_version}-{_LAST_PART}"}, count=count, block=block_ms if block_ms > 0 else None)
            if not reply:
                return []
            raw = list(reply[0][1])
            # A bulk import is several entries of one version: complete the last one if `count` cut it.
            last_id, last = raw[-1]
            parts, part = int(last.get(b"parts", 1)), int(last.get(b"part", 0))
            if part + 1 < parts:
                version = last_id.split(b"-")[0].decode()
                raw += self._r.xrange(log_key, f"{version}-{part + 1}", f"{version}-{parts - 1}")
        return _entries(raw, namespace)

    def log_versions(self) -> tuple[int, int]:
        """(first, last) version still in the log; (0, 0) when it is empty."""
        with reachable():
            first = self._r.xrange(self._key("log"), count=1)
            last = self._r.xrevrange(self._key("log"), count=1)
        if not first:
            return 0, 0
        return int(first[0][0].split(b"-")[0]), int(last[0][0].split(b"-")[0])

    def trim_log(self, keep: int) -> None:
        """Keep only the newest `keep` log entries (exactly); followers further behind will resync."""
        with reachable():
            self._r.xtrim(self._key("log"), maxlen=keep, approximate=False)

    def ping(self) -> bool:
        """True when the server answers."""
        try:
            with reachable():
                return bool(self._r.ping())
        except StoreUnavailable:
            return False


def _header(r: Record, dim: int, meta: str) -> str:
    """An item's state-hash header; `source` only when not "catalog", so older headers read the same."""
    h: dict[str, Any] = {"sku": r.sku, "shop_id": r.shop_id, "dim": dim, "meta": meta}
    if r.source != "catalog":
        h["source"] = r.source
    return json.dumps(h)


def _log_item(r: Record, meta: str) -> list[Any]:
    """An item's row in a stream entry: [item_id, sku, shop_id, metadata] (+ source when not "catalog")."""
    return [r.item_id, r.sku, r.shop_id, meta] + ([] if r.source == "catalog" else [r.source])


def _record(item_id: str, header: dict[str, Any], vector: bytes | None, version: int) -> Record:
    dim = int(header["dim"])
    vec = None if vector is None else np.frombuffer(vector, dtype="<f4", count=dim).astype(np.float32)
    source = header.get("source", "catalog")
    return Record(item_id, header["sku"], header["shop_id"], vec, json.loads(header["meta"]), version, vector is None, source)


def _entries(raw: list[tuple[bytes, dict[bytes, bytes]]], namespace: str) -> list[LogEntry]:
    """Stream entries -> one LogEntry per version (a bulk import's parts joined). A version whose
    parts are not all there (the stream was trimmed through it) is left out: the reader then sees
    a gap in versions and resynchronises, rather than applying half an import."""
    out: list[LogEntry] = []
    i = 0
    while i < len(raw):
        fields = raw[i][1]
        parts = int(fields.get(b"parts", 1))
        group = raw[i : i + parts]
        ok = len(group) == parts and [int(f.get(b"part", 0)) for _, f in group] == list(range(parts))
        ok = ok and len({f[b"v"] for _, f in group}) == 1
        if ok:
            entries = [_entry(f, namespace) for _, f in group]
            out.append(LogEntry(entries[0].version, entries[0].namespace, [r for e in entries for r in e.records], entries[0].written_at))
            i += parts
        else:  # skip this version's stray parts
            v = fields[b"v"]
            while i < len(raw) and raw[i][1][b"v"] == v:
                i += 1
    return out


def _entry(fields: dict[bytes, bytes], namespace: str) -> LogEntry:
    version, written_at = int(fields[b"v"]), float(fields[b"t"])
    if fields[b"op"] == b"delete":
        ids = json.loads(fields[b"items"])
        return LogEntry(version, None, [Record(i, "", None, None, version=version, deleted=True) for i in ids], written_at)
    ns = fields[b"ns"].decode()
    if ns != namespace:  # another model's vectors: only the version matters to this reader
        return LogEntry(version, ns, [], written_at)
    items = json.loads(fields[b"items"])
    dim = int(fields[b"dim"])
    vecs = np.frombuffer(fields[b"vecs"], dtype="<f4").reshape(len(items), dim) if items else np.zeros((0, dim), np.float32)
    records = [
        Record(row[0], row[1], row[2], vecs[i].astype(np.float32), json.loads(row[3]), version, source=(row[4:] or ["catalog"])[0])
        for i, row in enumerate(items)
    ]
    return LogEntry(version, ns, records, written_at)
