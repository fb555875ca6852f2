"""Opening the gallery store a deployment asks for."""

from __future__ import annotations

from index.feedback import FeedbackStore, SQLiteFeedbackStore
from index.jobs import JobStore, SQLiteJobStore
from index.records import Store
from index.redis_feedback import RedisFeedbackStore
from index.redis_jobs import RedisJobStore
from index.redis_store import RedisStore
from index.sqlite_store import SQLiteStore


def open_store(redis_url: str | None, redis_prefix: str, redis_log_maxlen: int, sqlite_path: str) -> Store:
    """Shared Redis when a URL is given (many replicas), else the embedded SQLite file (one process)."""
    if redis_url:
        return RedisStore(redis_url, redis_prefix, redis_log_maxlen)
    return SQLiteStore(sqlite_path)


def open_job_store(redis_url: str | None, redis_prefix: str, sqlite_path: str) -> JobStore:
    """Timeline jobs beside the gallery: in the same Redis (many replicas) or the same SQLite file."""
    if redis_url:
        return RedisJobStore(redis_url, redis_prefix)
    return SQLiteJobStore(sqlite_path)


def open_feedback_store(redis_url: str | None, redis_prefix: str, sqlite_path: str, max_records: int) -> FeedbackStore:
    """Request records and verdicts beside the gallery: the same Redis (many replicas) or SQLite file."""
    if redis_url:
        return RedisFeedbackStore(redis_url, redis_prefix, max_records)
    return SQLiteFeedbackStore(sqlite_path, max_records)
