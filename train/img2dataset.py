"""img2dataset output read as it is written, at any size: an on-disk index from a URL's file name to
where the image lies, built one shard at a time.

img2dataset writes, per shard, `<shard>.parquet` (one row per input URL: url, key, status,
error_message, ...) and either `<shard>/<key>.jpg` (+ .json, .txt; `--output_format files`) or
`<shard>.tar` holding the same members (`webdataset`). A failed download leaves NOTHING but its
parquet row, so failures are counted from the parquet. Tar members are not extracted: the index keeps
each image's byte offset and size, and a frame is referenced as `<tar path>#<offset>+<size>`
(`read_member_ref` / `train.data.read_image` read it in place).

The index is a SQLite file (name -> shard, member file or tar offset): memory stays at one shard's
parquet and listing whatever the release's size, shards already indexed are skipped on a re-run, and
a clip's frames (`<clip_id>-<idx4>`) or an image id's views (`<image_id>[-<k>]`) are one range query.
"""

from __future__ import annotations

import os
import re
import sqlite3
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from model.media import IMAGE_SUFFIXES

_REF = re.compile(r"^(?P<tar>.+\.tar)#(?P<offset>\d+)\+(?P<size>\d+)$")


def member_ref(tar: str, offset: int, size: int) -> str:
    """The string a manifest stores for an image inside a tar."""
    return f"{tar}#{offset}+{size}"


def read_member_ref(ref: str) -> bytes | None:
    """The bytes of `<tar>#<offset>+<size>`, or None when `ref` is not such a reference."""
    m = _REF.match(ref)
    if m is None:
        return None
    with open(m["tar"], "rb") as f:
        f.seek(int(m["offset"]))
        return f.read(int(m["size"]))


def url_name(url: str) -> str:
    """The file stem of a URL: a frame id `<clip_id>-<idx4>`, or an image id with its optional view suffix."""
    return Path(urlparse(url).path).stem


@dataclass
class ShardStats:
    ok: int = 0
    failed: int = 0  # parquet status != "success": img2dataset wrote no file
    missing: int = 0  # status "success" but no image on disk (deleted, partial copy)


def shard_parquets(root: Path) -> list[Path]:
    """A root's shard parquets in shard order: `<root>/<shard>.parquet` (or one folder level down)."""
    found = sorted(root.glob("*.parquet"))
    return found or sorted(root.glob("*/*.parquet"))


def _tar_images(path: Path) -> dict[str, tuple[int, int]]:
    """key -> (data offset, size) of the image members of one tar; reads headers only (seeks over data)."""
    out: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            stem, _, suffix = m.name.rpartition(".")  # string ops: a tar holds ~10k members, a release millions
            if m.isfile() and f".{suffix.lower()}" in IMAGE_SUFFIXES:
                out[stem.rpartition("/")[2]] = (m.offset_data, m.size)
        tar.members = []  # type: ignore[attr-defined]  # tarfile keeps every header otherwise
    return out


def _folder_images(path: Path) -> dict[str, str]:
    """key -> file name of the images in one `files` shard folder (names only, no stat)."""
    out: dict[str, str] = {}
    with os.scandir(path) as it:
        for e in it:
            stem, _, suffix = e.name.rpartition(".")
            if f".{suffix.lower()}" in IMAGE_SUFFIXES:
                out[stem] = e.name
    return out


def _read_status(parquet: Path) -> tuple[list[str], list[str], list[str]]:
    import pyarrow.parquet as pq  # the `train` extra; only the converter needs it

    table = pq.read_table(parquet, columns=["url", "key", "status"])
    return [str(x) for x in table["url"].to_pylist()], [str(x) for x in table["key"].to_pylist()], table["status"].to_pylist()


class DownloadIndex:
    """The SQLite index over img2dataset roots. `build()` walks shards in order (resumable); `frames(clip)`
    and `views(image_id)` look names up; `failed_by_root()` sums the parquet failures."""

    def __init__(self, db: Path) -> None:
        self.db = sqlite3.connect(db)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=OFF")  # a crash loses at most the shard being written: it is redone
        self.db.executescript(
            """CREATE TABLE IF NOT EXISTS shards(id INTEGER PRIMARY KEY, root TEXT, path TEXT UNIQUE, base TEXT,
                   tar INTEGER, ok INTEGER, failed INTEGER, missing INTEGER, done INTEGER DEFAULT 0);
               CREATE TABLE IF NOT EXISTS files(name TEXT PRIMARY KEY, shard INTEGER, member TEXT, off INTEGER, size INTEGER)
                   WITHOUT ROWID;"""
        )
        self._bases: dict[int, tuple[str, bool]] | None = None

    def close(self) -> None:
        self.db.close()

    def build(self, roots: Sequence[Path]) -> int:
        """Index every shard not indexed yet; returns how many shards were indexed now."""
        done = {p for (p,) in self.db.execute("SELECT path FROM shards WHERE done = 1")}
        n = 0
        for root in roots:
            for parquet in shard_parquets(root):
                if str(parquet) not in done:
                    self._index_shard(root, parquet)
                    n += 1
        self._bases = None
        return n

    def _index_shard(self, root: Path, parquet: Path) -> None:
        shard = parquet.with_suffix("")
        tar = shard.with_suffix(".tar")
        is_tar = tar.is_file()
        located: dict[str, tuple[int, int]] | dict[str, str]
        located = _tar_images(tar) if is_tar else (_folder_images(shard) if shard.is_dir() else {})
        urls, keys, status = _read_status(parquet)
        stats, rows = ShardStats(), []
        for url, key, st in zip(urls, keys, status, strict=True):
            if st != "success":
                stats.failed += 1
                continue
            where = located.get(key)
            if where is None:
                stats.missing += 1
                continue
            stats.ok += 1
            rows.append((url_name(url), where))
        base = str((tar if is_tar else shard).resolve())
        with self.db:  # one transaction per shard: either all of it is indexed or none
            self.db.execute("DELETE FROM shards WHERE path = ?", (str(parquet),))
            cur = self.db.execute(
                "INSERT INTO shards(root, path, base, tar, ok, failed, missing, done) VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                (str(root), str(parquet), base, int(is_tar), stats.ok, stats.failed, stats.missing),
            )
            sid = cur.lastrowid
            if is_tar:
                self.db.executemany(
                    "INSERT OR IGNORE INTO files VALUES (?, ?, NULL, ?, ?)",
                    ((name, sid, w[0], w[1]) for name, w in rows),
                )
            else:
                self.db.executemany("INSERT OR IGNORE INTO files VALUES (?, ?, ?, NULL, NULL)", ((name, sid, w) for name, w in rows))

    def relative_to(self, folder: Path) -> None:
        """Give references under `folder` relative to it (manifests in `folder` store them so)."""
        top = folder.resolve()
        self._bases = {}
        for i, b, t in self.db.execute("SELECT id, base, tar FROM shards"):
            q = Path(b)
            self._bases[i] = (str(q.relative_to(top)) if q.is_relative_to(top) else b, bool(t))

    def _base(self, sid: int) -> tuple[str, bool]:
        if self._bases is None:
            self._bases = {i: (b, bool(t)) for i, b, t in self.db.execute("SELECT id, base, tar FROM shards")}
        return self._bases[sid]

    def _ref(self, sid: int, member: str | None, off: int | None, size: int | None) -> str:
        base, is_tar = self._base(sid)
        return member_ref(base, int(off or 0), int(size or 0)) if is_tar else f"{base}/{member}"

    def _range(self, lo: str, hi: str) -> Iterator[tuple[str, str]]:
        """(name, reference) of every name in [lo, hi), in name order (one index range scan)."""
        q = "SELECT name, shard, member, off, size FROM files WHERE name >= ? AND name < ? ORDER BY name"
        for name, sid, member, off, size in self.db.execute(q, (lo, hi)):
            yield name, self._ref(sid, member, off, size)

    def frames(self, clip_id: str) -> dict[str, str]:
        """frame id -> reference, for the downloaded frames `<clip_id>-<idx>` of one clip, in frame order."""
        return {n: r for n, r in self._range(clip_id + "-", clip_id + "-\U0010ffff") if n.rsplit("-", 1)[0] == clip_id}

    def views(self, image_id: str) -> dict[str, str]:
        """name -> reference of the downloaded files of one shop image id: `<image_id>` and `<image_id>-<k>`
        ('-' sorts just before '.', so [id, id + '.') holds exactly those and nothing longer)."""
        return {n: r for n, r in self._range(image_id, image_id + ".") if n == image_id or n.startswith(image_id + "-")}

    def get(self, name: str) -> str | None:
        row = self.db.execute("SELECT shard, member, off, size FROM files WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._ref(*row)

    def failed_by_root(self) -> dict[str, dict[str, int]]:
        """root -> {"ok", "failed", "missing", "shards"} summed over its shards."""
        q = "SELECT root, SUM(ok), SUM(failed), SUM(missing), COUNT(*) FROM shards WHERE done = 1 GROUP BY root ORDER BY root"
        return {r: {"ok": int(o), "failed": int(f), "missing": int(m), "shards": int(n)} for r, o, f, m, n in self.db.execute(q)}
