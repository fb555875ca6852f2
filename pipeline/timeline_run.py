"""Running a recording through the pipeline window by window, as its frames stream in.

The decoder child (`pipeline.stream_decode`) sends sampled frames in time order; they are embedded
in chunks through the Pipeline's own Embed stage (the shared batcher, with the caller's priority).
The moment a window is complete, its frames and embeddings run the Pipeline's stage list as a
"window" query: the same stages a clip runs after embedding (frame weighting, search, region
search, and whatever else declares the window kind), so a window is recognised as the same piece
uploaded as a clip would be. Only the windows' top SKUs are kept, so memory stays flat whatever the
recording's length; `pipeline.timeline.smooth` turns them into segments at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index.errors import BadRequest, InvalidMedia
from pipeline.batcher import Priority
from pipeline.stages import Pipeline, Query, clip_vector
from pipeline.stream_decode import FrameStream, SampledFrame, StreamEnd, StreamInfo, StreamLimits
from pipeline.timeline import Candidate, Segment, WindowHits, cell_bounds, smooth, window_grid, windows_of

Message = StreamInfo | SampledFrame | StreamEnd


@dataclass(frozen=True)
class TimelineOptions:
    """What a client asks of one timeline (the query parameters of both endpoints)."""

    shop_id: str | None = None
    window_s: float = 2.0
    stride_s: float | None = None  # None = window_s (windows side by side)
    top_k: int = 3
    min_score: float | None = None  # the match threshold and the floor; None = the model's threshold, RICE_TIMELINE_MIN_SCORE

    @property
    def stride(self) -> float:
        return self.window_s if self.stride_s is None else self.stride_s

    def check(self) -> None:
        if not 0.25 <= self.window_s <= 60:
            raise BadRequest("window_s must be between 0.25 and 60 seconds")
        if not 0 < self.stride <= self.window_s:
            raise BadRequest("stride_s must be positive and at most window_s")
        if self.top_k < 1:
            raise BadRequest("top_k must be at least 1")


@dataclass
class Timeline:
    duration_s: float
    segments: list[Segment]
    gallery_version: int
    frames_used: int
    windows: int
    match_threshold: float
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TimelineConfig:
    """How recordings are cut and smoothed (operator settings, not per request)."""

    sample_fps: float = 2.0  # frames sampled per second of recording
    switch_cost: float = 0.03  # Viterbi price of a change of product, in score units
    min_contrast: float = 0.06  # how far a SKU must stand out from a window's other candidates
    min_lift: float = 0.02  # how far a SKU must score above its level in the rest of the recording
    min_score: float = 0.5  # below this score a SKU is never on screen (unless a request sets min_score)
    candidates: int = 10  # SKUs kept per window for smoothing (at least top_k)
    chunk_frames: int = 32  # frames per batcher submission
    chunks_in_flight: int = 2  # submissions outstanding, so the batcher always has the next one
    limits: StreamLimits = field(default_factory=StreamLimits)


# A complete window: its frames [N, S, S, 3] and their embeddings [N, D], or None when no frame fell in it.
WindowFrames = tuple[np.ndarray, np.ndarray] | None


class _Windows:
    """Frames and their embeddings gathered per window until the window is complete."""

    def __init__(self, window_s: float, stride_s: float) -> None:
        self.window_s, self.stride_s = window_s, stride_s
        self.open: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.next_index = 0  # windows before it are complete and handed out

    def add(self, t: float, frame: np.ndarray, emb: np.ndarray) -> None:
        for k in windows_of(t, self.window_s, self.stride_s, 1 << 40):
            self.open.setdefault(k, []).append((frame, emb))

    def complete_before(self, t: float) -> list[tuple[int, WindowFrames]]:
        """Windows that end at or before `t` (no later frame can join them), with their clip vector."""
        out = []
        while self.next_index * self.stride_s + self.window_s <= t:
            out.append(self._pop(self.next_index))
        return out

    def rest(self, n_windows: int) -> list[tuple[int, WindowFrames]]:
        """Every window up to `n_windows` not handed out yet (the stream ended); frames past the
        last window (a header that understated the length) join the last one."""
        for k in [k for k in self.open if k >= n_windows]:
            self.open.setdefault(n_windows - 1, []).extend(self.open.pop(k))
        out = []
        while self.next_index < n_windows:
            out.append(self._pop(self.next_index))
        return out

    def _pop(self, k: int) -> tuple[int, WindowFrames]:
        self.next_index = k + 1
        got = self.open.pop(k, None)
        if not got:
            return k, None
        return k, (np.stack([f for f, _ in got]), np.stack([e for _, e in got]))


class TimelineRunner:
    """Turns a recording on disk into a Timeline through one Pipeline's stage list."""

    def __init__(self, pipeline: Pipeline, config: TimelineConfig) -> None:
        self.pipeline = pipeline
        self.config = config

    async def run(
        self,
        path: str | Path,
        options: TimelineOptions,
        priority: Priority = "interactive",
        on_progress: Callable[[float], object] = lambda fraction: None,
    ) -> Timeline:
        """Decode `path` in a child process, embed and search each window, smooth. Cancelling the
        caller kills the decoder and drops the frames still queued in the batcher."""
        options.check()
        cfg = self.config
        started = time.perf_counter()
        timings = {"decode": 0.0, "encode": 0.0}  # + every window stage's time, summed over windows
        loop = asyncio.get_running_loop()
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="timeline-decode")
        stream: FrameStream | None = None
        chunks: list[asyncio.Task[np.ndarray]] = []
        searches: list[asyncio.Task[WindowHits]] = []
        try:
            stream = await loop.run_in_executor(reader, FrameStream, path, cfg.sample_fps, self.pipeline.preprocess, cfg.limits)
            messages = stream.read()
            windows = _Windows(options.window_s, options.stride)
            pending: list[SampledFrame] = []  # sampled, not yet submitted
            submitted: list[list[SampledFrame]] = []  # per chunk task, in order
            info: StreamInfo | None = None
            end: StreamEnd | None = None
            frames_used = 0
            gallery_version = 0
            k_search = max(options.top_k, cfg.candidates)

            async def search(k: int, window: WindowFrames) -> WindowHits:
                start, stop = k * options.stride, k * options.stride + options.window_s
                if window is None:  # no frame fell in this window
                    return WindowHits(start, stop, [])
                frames, emb = window
                q = Query(
                    "window", b"", k_search, options.shop_id, priority=priority, frames=frames, frame_emb=emb, vector=clip_vector(emb)
                )
                await self.pipeline.run(q)
                for name, ms in q.timings_ms.items():
                    if name != "total":
                        timings[name] = timings.get(name, 0.0) + ms
                nonlocal gallery_version
                gallery_version = max(gallery_version, q.gallery_version)
                return WindowHits(start, stop, [Candidate(h.sku, h.score, h.item_id) for h in q.hits])

            async def embed(frames: np.ndarray) -> np.ndarray:
                t = time.perf_counter()
                emb = await self.pipeline.embedder.embed(frames, priority)
                timings["encode"] += (time.perf_counter() - t) * 1e3
                return emb

            async def collect_oldest() -> None:
                """Wait for the oldest chunk; file its frames into windows; search finished windows."""
                nonlocal frames_used
                emb = await chunks.pop(0)
                frames = submitted.pop(0)
                for f, e in zip(frames, emb, strict=True):
                    windows.add(f.t, f.frame, e)
                frames_used += len(frames)
                for k, window in windows.complete_before(frames[-1].t):
                    searches.append(asyncio.create_task(search(k, window)))

            def submit(batch: list[SampledFrame]) -> None:
                chunks.append(asyncio.create_task(embed(np.stack([f.frame for f in batch]))))
                submitted.append(batch)

            while end is None:
                t = time.perf_counter()
                got = await loop.run_in_executor(reader, _take, messages, cfg.chunk_frames)
                timings["decode"] += (time.perf_counter() - t) * 1e3
                for m in got:
                    if isinstance(m, StreamInfo):
                        info = m
                    elif isinstance(m, StreamEnd):
                        end = m
                    else:
                        pending.append(m)
                while len(pending) >= cfg.chunk_frames or (end is not None and pending):
                    submit(pending[: cfg.chunk_frames])
                    pending = pending[cfg.chunk_frames :]
                while len(chunks) > (0 if end is not None else cfg.chunks_in_flight - 1):
                    await collect_oldest()
                if info is not None and info.duration_s > 0 and frames_used:
                    on_progress(min(0.99, windows.next_index * options.stride / info.duration_s))
            duration = end.duration_s
            if frames_used == 0:
                raise InvalidMedia("no decodable video frames in the recording")
            grid = window_grid(duration, options.window_s, options.stride)
            for k, window in windows.rest(len(grid)):
                searches.append(asyncio.create_task(search(k, window)))
            hits = list(await asyncio.gather(*searches))[: len(grid)]
            hits = [WindowHits(s, e, h.hits) for (s, e), h in zip(grid, hits, strict=True)]
            threshold = self.pipeline.match_threshold if options.min_score is None else options.min_score
            lowest = cfg.min_score if options.min_score is None else options.min_score
            t = time.perf_counter()
            cells = cell_bounds(len(grid), options.window_s, options.stride, duration)
            segments = smooth(hits, cells, threshold, cfg.switch_cost, options.top_k, cfg.min_contrast, cfg.min_lift, lowest)
            timings["smooth"] = (time.perf_counter() - t) * 1e3
            timings["total"] = (time.perf_counter() - started) * 1e3
            on_progress(1.0)
            return Timeline(round(duration, 3), segments, gallery_version, frames_used, len(grid), threshold, timings)
        finally:
            for task in (*chunks, *searches):
                task.cancel()
            for task in (*chunks, *searches):
                with contextlib.suppress(BaseException):
                    await task
            if stream is not None:
                stream.kill()  # the reader thread, if mid-read, sees the pipe close and returns
                reader.submit(stream.close)  # after that read: one worker runs them in order
            reader.shutdown(wait=False)


def _take(messages: Iterator[Message], n: int) -> list[Message]:
    """Up to `n` frames from the stream (with any header before them), or up to its end.
    `messages` is FrameStream.read(), advanced on the reader thread only."""
    out: list[Message] = []
    frames = 0
    for m in messages:
        out.append(m)
        if isinstance(m, StreamEnd):
            break
        frames += isinstance(m, SampledFrame)
        if frames >= n:
            break
    return out


def timeline_answer(timeline: Timeline, model_version: str) -> dict[str, object]:
    """The JSON answer of both timeline endpoints (a job's `result` is exactly this)."""
    return {
        "duration_s": timeline.duration_s,
        "segments": [
            {
                "start_s": s.start_s,
                "end_s": s.end_s,
                "sku": s.sku,
                "score": s.score,
                "item_id": s.item_id,
                "match": s.match,
                "alternatives": [{"sku": sku, "score": score} for sku, score in s.alternatives],
            }
            for s in timeline.segments
        ],
        "match_threshold": timeline.match_threshold,
        "gallery_version": timeline.gallery_version,
        "model_version": model_version,
        "frames_used": timeline.frames_used,
        "windows": timeline.windows,
        "timings_ms": {k: round(v, 3) for k, v in timeline.timings_ms.items()},
    }
