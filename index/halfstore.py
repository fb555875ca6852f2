"""The gallery's full vectors as float16 rows, for galleries past the compression threshold.

Half the bytes of float32 (1M x 1280: 2.56 GB instead of 5.1 GB), and precise enough to re-score a
compressed index's shortlist exactly (a unit vector's float16 rounding moves an inner product by
about 1e-3 at most, well below the gaps between neighbours that recall@10 measures). Rows live in
fixed-size blocks, so growth allocates a new block and never copies the old ones (a copy of a
2.5 GB array would double the peak memory); a fresh block is zero-filled by the OS lazily, so its
unused tail costs no resident memory.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

BLOCK_BITS = 16  # 65,536 rows a block: 168 MB at 1280-d


class HalfStore:
    """Rows indexed by slot; `get` and `scan` return float32 for the matrix products."""

    def __init__(self, dim: int, block_bits: int = BLOCK_BITS) -> None:
        self.dim = dim
        self._bits = block_bits
        self._block = 1 << block_bits
        self._blocks: list[np.ndarray] = []  # each [block, D] float16
        self.size = 0  # slots in use: rows [0, size)

    @property
    def nbytes(self) -> int:
        return self.size * self.dim * 2

    def put(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        """Write rows [S, D] at slots [S], growing the store to cover the largest slot."""
        slots = np.asarray(slots, np.int64)
        if not len(slots):
            return
        top = int(slots.max()) + 1
        while len(self._blocks) * self._block < top:
            self._blocks.append(np.zeros((self._block, self.dim), np.float16))
        self.size = max(self.size, top)
        half = np.asarray(vectors, np.float32).astype(np.float16)
        blocks, rows = slots >> self._bits, slots & (self._block - 1)
        for b in np.unique(blocks).tolist():
            m = blocks == b
            self._blocks[b][rows[m]] = half[m]

    def get(self, slots: np.ndarray) -> np.ndarray:
        """Rows [S, D] float32 at the given slots (a gather: the shortlist, a shop's rows)."""
        slots = np.asarray(slots, np.int64)
        out = np.empty((len(slots), self.dim), np.float32)
        blocks, rows = slots >> self._bits, slots & (self._block - 1)
        if len(slots) and blocks[0] == blocks[-1] and (blocks == blocks[0]).all():  # the common case below 65k rows
            out[:] = self._blocks[int(blocks[0])][rows]
            return out
        for b in np.unique(blocks).tolist():
            m = blocks == b
            out[m] = self._blocks[b][rows[m]]
        return out

    def scan(self, step: int = 16_384) -> Iterator[tuple[int, np.ndarray]]:
        """(first slot, rows [<= step, D] float32) over every slot in order: bounded temporaries."""
        for start in range(0, self.size, step):
            yield start, self.get(np.arange(start, min(self.size, start + step)))


class HalfRows:
    """A lazy [N, D] float32 view of some slots of a `HalfStore` (a compressed gallery's export):
    slices convert just their rows from float16, so streaming a million rows never holds more
    than a chunk as float32 (a full copy would be 5.1 GB at 1M x 1280, the float16 rows 2.56 GB).

    The gallery pins those slots while this view is alive (a freed slot is not rewritten or reused
    until `release`), so the rows read late are the rows of the export's version. `release` runs
    once the last row has been read, or when the view is dropped unread (a client that hung up)."""

    dtype = np.dtype(np.float32)

    def __init__(self, store: HalfStore, slots: np.ndarray, release: Callable[[], None]) -> None:
        self._store = store
        self._slots = slots
        self.shape = (len(slots), store.dim)
        self.size = len(slots) * store.dim
        self._finalizer = weakref.finalize(self, release)

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, rows: slice) -> np.ndarray:
        """Rows [a:b] as float32 (slices only: what a streaming reader asks for)."""
        if not isinstance(rows, slice):
            raise TypeError("HalfRows reads slices of rows")
        start, stop, step = rows.indices(len(self._slots))
        out = self._store.get(self._slots[start:stop:step])
        if stop >= len(self._slots):
            self.release()  # the last rows are out: later writes may reuse the slots
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole [N, D] float32 copy (np.asarray): for small galleries and tests, not for streaming."""
        out = self._store.get(self._slots)
        return out if dtype is None else out.astype(dtype)

    def release(self) -> None:
        """Unpin the slots now (idempotent)."""
        self._finalizer()
