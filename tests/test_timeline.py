"""Timelines without a server: the window grid, Viterbi smoothing, and the streaming decoder process."""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from index.errors import InvalidMedia, UndecodableMedia, UnsupportedMedia
from model.config import PreprocessConfig
from pipeline.stream_decode import FrameStream, SampledFrame, StreamEnd, StreamInfo, StreamLimits, sample_times
from pipeline.timeline import Candidate, WindowHits, cell_bounds, smooth, window_grid, windows_of
from tools.clipsynth import write_video


def test_window_grid_covers_the_recording_and_cells_tile_it() -> None:
    assert window_grid(21.0, 2.0, 2.0)[-1] == (20.0, 21.0) and len(window_grid(21.0, 2.0, 2.0)) == 11
    assert window_grid(1.5, 2.0, 2.0) == [(0.0, 1.5)]
    overlapping = window_grid(10.0, 2.0, 1.0)
    assert overlapping[0] == (0.0, 2.0) and overlapping[-1] == (8.0, 10.0) and len(overlapping) == 9
    cells = cell_bounds(9, 2.0, 1.0, 10.0)
    assert cells[0] == (0.0, 1.5) and cells[-1] == (8.5, 10.0)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(cells))
    assert cell_bounds(11, 2.0, 2.0, 21.0)[-1] == (20.0, 21.0)
    assert list(windows_of(2.5, 2.0, 1.0, 9)) == [1, 2] and list(windows_of(9.5, 2.0, 1.0, 9)) == [8]
    with pytest.raises(ValueError):
        window_grid(10.0, 2.0, 3.0)  # a stride past the window leaves gaps


def test_sample_times_spread_frames_evenly_and_never_repeat() -> None:
    it = sample_times(10.0, 2.0)
    assert [next(it) for _ in range(4)] == [2, 8, 12, 18]  # 0.25 s, 0.75 s, 1.25 s, 1.75 s at 10 fps
    slow = sample_times(1.0, 2.0)  # asking for more frames than exist: each frame once
    assert [next(slow) for _ in range(3)] == [0, 1, 2]


def _windows(rows: list[dict[str, float]], window_s: float = 2.0) -> tuple[list[WindowHits], list[tuple[float, float]]]:
    windows = [
        WindowHits(i * window_s, (i + 1) * window_s, sorted((Candidate(s, v, f"{s}-img") for s, v in row.items()), key=lambda c: -c.score))
        for i, row in enumerate(rows)
    ]
    return windows, cell_bounds(len(rows), window_s, window_s, len(rows) * window_s)


_BG = {"x1": 0.40, "x2": 0.41, "x3": 0.39, "x4": 0.40}  # the rest of the gallery, unremarkable


def test_smoothing_absorbs_a_flicker_that_a_per_window_argmax_keeps() -> None:
    rows = [
        {"A": 0.70, "B": 0.55, **_BG},
        {"A": 0.72, "B": 0.56, **_BG},
        {"A": 0.58, "B": 0.60, **_BG},  # the seller turns A: one window leans to B
        {"A": 0.71, "B": 0.55, **_BG},
        {"A": 0.42, "B": 0.70, **_BG},
        {"A": 0.41, "B": 0.72, **_BG},
    ]
    windows, cells = _windows(rows)
    argmax = [max(r, key=r.__getitem__) for r in rows]
    assert argmax == ["A", "A", "B", "A", "B", "B"]  # four segments
    segments = smooth(windows, cells, threshold=0.5, switch_cost=0.05, top_k=3)
    assert [(s.start_s, s.end_s, s.sku) for s in segments] == [(0.0, 8.0, "A"), (8.0, 12.0, "B")]
    a = segments[0]
    assert a.match and a.item_id == "A-img" and a.score == pytest.approx((0.70 + 0.72 + 0.58 + 0.71) / 4, abs=1e-4)
    assert [sku for sku, _ in a.alternatives] == ["B", "x2"]  # top_k = the SKU and two alternatives


def test_a_gap_is_a_null_segment_and_a_product_can_come_back() -> None:
    room = {"A": 0.56, "B": 0.57, "C": 0.55, **_BG, "x1": 0.55, "x2": 0.56, "x3": 0.54}  # above 0.5, nothing stands out
    rows = [{"A": 0.70, **_BG}, {"A": 0.69, **_BG}, room, room, {"B": 0.71, **_BG}, {"A": 0.68, **_BG}, {"A": 0.70, **_BG}]
    windows, cells = _windows(rows)
    plain = smooth(windows, cells, threshold=0.5, switch_cost=0.02, top_k=2)
    assert [s.sku for s in plain][2] is not None  # without the contrast margin the room is "a product"
    segments = smooth(windows, cells, threshold=0.5, switch_cost=0.02, top_k=2, min_contrast=0.075)
    assert [(s.start_s, s.end_s, s.sku) for s in segments] == [(0.0, 4.0, "A"), (4.0, 8.0, None), (8.0, 10.0, "B"), (10.0, 14.0, "A")]
    gap = segments[1]
    assert not gap.match and gap.score is None and gap.item_id is None and len(gap.alternatives) == 2


def test_below_the_threshold_nothing_is_a_product() -> None:
    windows, cells = _windows([{"A": 0.45, **_BG}] * 3)
    segments = smooth(windows, cells, threshold=0.5, switch_cost=0.02, top_k=1)
    assert [(s.start_s, s.end_s, s.sku) for s in segments] == [(0.0, 6.0, None)]
    assert smooth(windows, cells, threshold=0.42, switch_cost=0.02, top_k=1)[0].sku == "A"  # min_score per request


@pytest.fixture
def counting_clip(tmp_path: Path) -> Path:
    """4 s at 10 fps whose frame i has brightness 5 * i: a decoded frame names its index."""
    frames = [np.full((64, 96, 3), 5 * i, np.uint8) for i in range(40)]
    path = tmp_path / "count.avi"  # MJPG keeps flat colours exact enough
    write_video(frames, path, fps=10)
    return path


def test_stream_decoder_sends_sampled_frames_in_order_with_their_times(counting_clip: Path) -> None:
    with FrameStream(counting_clip, 2.0, PreprocessConfig(resize=32, crop=32), StreamLimits()) as stream:
        messages = list(stream.read())
    info, *frames, end = messages
    assert isinstance(info, StreamInfo) and info.fps == pytest.approx(10) and info.total_frames == 40
    assert isinstance(end, StreamEnd) and end.frames_read == 40 and end.duration_s == pytest.approx(4.0)
    assert all(isinstance(f, SampledFrame) for f in frames)
    times = [f.t for f in frames if isinstance(f, SampledFrame)]
    assert times == pytest.approx([0.2, 0.8, 1.2, 1.8, 2.2, 2.8, 3.2, 3.8])
    levels = [int(f.frame.mean()) for f in frames if isinstance(f, SampledFrame)]
    assert [round(v / 5) for v in levels] == [2, 8, 12, 18, 22, 28, 32, 38]
    assert frames[0].frame.shape == (32, 32, 3)  # type: ignore[union-attr]


def test_stream_decoder_rejects_what_is_not_a_video(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    with FrameStream(junk, 2.0, PreprocessConfig(), StreamLimits()) as stream, pytest.raises(UnsupportedMedia):
        list(stream.read())


def test_stream_decoder_enforces_the_duration_limit(counting_clip: Path) -> None:
    with (
        FrameStream(counting_clip, 2.0, PreprocessConfig(), StreamLimits(max_duration_s=2.0)) as stream,
        pytest.raises(InvalidMedia, match="limit"),
    ):
        list(stream.read())


def test_a_crashed_decoder_fails_the_recording_not_the_caller(counting_clip: Path) -> None:
    with FrameStream(counting_clip, 2.0, PreprocessConfig(), StreamLimits()) as stream:
        messages = stream.read()
        assert isinstance(next(messages), StreamInfo)
        os.kill(stream.pid, signal.SIGSEGV)  # what a crafted file does to FFmpeg
        with pytest.raises(UndecodableMedia, match=r"crashed|stopped"):
            list(messages)


def test_a_sku_at_its_usual_level_is_not_on_screen_even_when_it_stands_out() -> None:
    # In the "room" windows x1 ranks first and clears both the threshold and the contrast margin,
    # but it scores no more than it does while A and B are shown: it is not on screen.
    room = {"x1": 0.60, "A": 0.50, "B": 0.50, "x2": 0.50, "x3": 0.49, "x4": 0.50}
    a = {"A": 0.75, "x1": 0.60, "B": 0.52, "x2": 0.50, "x3": 0.50, "x4": 0.50}
    b = {"B": 0.76, "x1": 0.61, "A": 0.52, "x2": 0.50, "x3": 0.50, "x4": 0.50}
    windows, cells = _windows([a, a, a, room, room, b, b, b])
    without = smooth(windows, cells, threshold=0.5, switch_cost=0.03, top_k=1, min_contrast=0.06)
    assert [s.sku for s in without] == ["A", "x1", "B"]
    segments = smooth(windows, cells, threshold=0.5, switch_cost=0.03, top_k=1, min_contrast=0.06, min_lift=0.02)
    assert [(s.start_s, s.end_s, s.sku) for s in segments] == [(0.0, 6.0, "A"), (6.0, 10.0, None), (10.0, 16.0, "B")]


def test_the_one_product_of_a_recording_is_kept_by_the_lift_margin() -> None:
    windows, cells = _windows([{"A": 0.7, **_BG}] * 5)  # A everywhere: it has no absent level
    segments = smooth(windows, cells, threshold=0.5, switch_cost=0.03, top_k=1, min_contrast=0.06, min_lift=0.02)
    assert [(s.start_s, s.end_s, s.sku) for s in segments] == [(0.0, 10.0, "A")]


def test_an_empty_gallery_gives_one_null_segment() -> None:
    windows = [WindowHits(0.0, 2.0, []), WindowHits(2.0, 3.0, [])]
    segments = smooth(windows, cell_bounds(2, 2.0, 2.0, 3.0), threshold=0.5, switch_cost=0.03, top_k=3, min_contrast=0.06, min_lift=0.02)
    assert [(s.start_s, s.end_s, s.sku, s.alternatives) for s in segments] == [(0.0, 3.0, None, [])]
