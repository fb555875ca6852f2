"""`rice recognize`: many clips and stills against a running service, a few at a time, printed as a
table, CSV or JSON in the order given.

Stills (by suffix, else by their first bytes) go to /v1/recognize/image, clips to /v1/recognize.
A file the service rejects (too big, not media, undecodable: 413, 415, 422) is reported and the
run goes on; anything that would fail every file (no connection, a refused key, a bad parameter,
a server error) stops the run with that error.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tools.client import IMAGE_SUFFIXES, VIDEO_SUFFIXES, ApiError, AsyncRiceClient, Recognition, RequestRejected

# The file's own fault (too big, not media, undecodable): other files may still succeed. By error
# code, not status: a 422 is also what a malformed parameter gets, and that would fail every file.
FILE_ERRORS = frozenset({"payload_too_large", "unsupported_media", "invalid_media"})
CSV_FIELDS = ("path", "status", "match", "sku", "score", "item_id", "shop_id", "top_k", "error")


@dataclass
class Outcome:
    path: Path
    answer: Recognition | None = None
    error: ApiError | None = None

    @property
    def status(self) -> int:
        return 200 if self.answer is not None else self.error.status if self.error is not None else 0


def media_files(paths: list[Path]) -> list[Path]:
    """The files given, with folders expanded to the clips and stills inside them (sorted)."""
    out: list[Path] = []
    wanted = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in wanted)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(2, "no such file or folder", str(p))
    return out


async def recognize_all(
    client: AsyncRiceClient, files: list[Path], concurrency: int, on_done: Callable[[int, Outcome], None], **options: Any
) -> list[Outcome]:
    """Recognise every file with at most `concurrency` requests in flight; `on_done(index, outcome)`
    is called as each finishes. Run-stopping errors propagate after the others are cancelled."""
    gate = asyncio.Semaphore(max(1, concurrency))
    outcomes: list[Outcome | None] = [None] * len(files)

    async def one(i: int, path: Path) -> None:
        async with gate:
            data = await asyncio.to_thread(path.read_bytes)
            try:
                outcome = Outcome(path, answer=await client.recognize(data, filename=path.name, **options))
            except RequestRejected as exc:
                if exc.code not in FILE_ERRORS:
                    raise
                outcome = Outcome(path, error=exc)
        outcomes[i] = outcome
        on_done(i, outcome)

    async with asyncio.TaskGroup() as group:  # the first run-stopping error cancels the rest
        for i, path in enumerate(files):
            group.create_task(one(i, path))
    return [o for o in outcomes if o is not None]


def _exception_of(group: BaseException) -> BaseException:
    """The first error inside (nested) exception groups: the one line the user needs."""
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def run(
    client: AsyncRiceClient, files: list[Path], concurrency: int, emit: Callable[[int, Outcome], None], **options: Any
) -> list[Outcome]:
    try:
        return asyncio.run(_run(client, files, concurrency, emit, **options))
    except BaseExceptionGroup as group:
        raise _exception_of(group) from None


async def _run(
    client: AsyncRiceClient, files: list[Path], concurrency: int, emit: Callable[[int, Outcome], None], **options: Any
) -> list[Outcome]:
    async with client:
        return await recognize_all(client, files, concurrency, emit, **options)


class InOrder:
    """Calls `show` for outcomes in the order of the files, as soon as all earlier ones are done."""

    def __init__(self, show: Callable[[Outcome], None]) -> None:
        self.show = show
        self.pending: dict[int, Outcome] = {}
        self.next = 0

    def __call__(self, index: int, outcome: Outcome) -> None:
        self.pending[index] = outcome
        while self.next in self.pending:
            self.show(self.pending.pop(self.next))
            self.next += 1


def no_match_reason(a: Recognition, by_score: bool) -> str:
    """Why an answer with results is no match, from what the answer carries: the verdict's probability
    when the verdict decided (its threshold is not in the answer: GET /v1/info `match_probability`),
    else the top-1 score against match_threshold (the request set min_score, or no verdict ran)."""
    if a.match_probability is not None and not by_score:
        return f"match probability {a.match_probability:.2f}"
    top = a.top
    score = f"top-1 score {top.score:.2f} < " if top is not None else "below "
    return f"{score}{a.match_threshold:.2f}"


def table_line(o: Outcome, empty: Callable[[], str], by_score: bool = False) -> str:
    """One human-readable line per file; `empty()` explains an answer without results; `by_score`: the
    request set min_score, so the score threshold decided `match`, not the verdict."""
    if o.answer is None:
        assert o.error is not None
        return f"{o.path}: HTTP {o.error.status} {o.error.detail}"
    a = o.answer
    shown = ", ".join(f"{m.sku} ({m.score:.2f})" for m in a.results) or empty()
    verdict = "" if not a.results else " [match]" if a.match else f" [no match: {no_match_reason(a, by_score)}]"
    return f"{o.path}: {shown}{verdict}"


def json_record(o: Outcome) -> dict[str, Any]:
    if o.answer is not None:
        return {"path": str(o.path), "status": 200, **asdict(o.answer)}
    assert o.error is not None
    return {"path": str(o.path), "status": o.error.status, "error": {"code": o.error.code, "message": o.error.detail}}


def csv_row(o: Outcome) -> str:
    """One CSV row per file: the top SKU, and all top-k as sku:score;... (header: CSV_FIELDS)."""
    buf = io.StringIO()
    a = o.answer
    top = a.top if a is not None else None
    row = {
        "path": str(o.path),
        "status": o.status,
        "match": "" if a is None else str(a.match).lower(),
        "sku": top.sku if top else "",
        "score": f"{top.score:.4f}" if top else "",
        "item_id": top.item_id if top else "",
        "shop_id": (top.shop_id or "") if top else "",
        "top_k": ";".join(f"{m.sku}:{m.score:.4f}" for m in a.results) if a is not None else "",
        "error": o.error.detail if o.error is not None else "",
    }
    csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n").writerow(row)
    return buf.getvalue().rstrip("\n")


def csv_header() -> str:
    return ",".join(CSV_FIELDS)


def print_json(outcomes: list[Outcome]) -> None:
    print(json.dumps([json_record(o) for o in outcomes], indent=2))
