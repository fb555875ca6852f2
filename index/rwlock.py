"""A readers-writer lock: searches share the gallery, a write has it alone.

Writer-preferring: once a writer waits, new readers queue behind it, so a stream of overlapping
searches cannot starve a gallery write; the writer waits only for the searches already running.

Readers waiting when a writer lets go are let in before the next writer (a hand-off): a bulk import
applies its rows as many short writes back to back, and without the hand-off the searches queued
behind it would wait for the whole import instead of one chunk.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # searches holding the lock now
        self._writer = False  # a writer holds the lock
        self._waiting_writers = 0
        self._waiting_readers = 0
        self._handoff = 0  # readers still to be let in before the next writer

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._waiting_readers += 1
            try:
                while self._writer or (self._waiting_writers and not self._handoff):
                    self._cond.wait()
            finally:
                self._waiting_readers -= 1
            self._handoff = max(0, self._handoff - 1)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers or self._handoff:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._handoff = self._waiting_readers
                self._cond.notify_all()
