"""The approximate index for large galleries: IVF-Flat on inner product, trained in the background.

Why IVF and not HNSW: the gallery changes all the time (shops add and delete products), and
faiss's IVF supports `add_with_ids` and `remove_ids` in place, while its HNSW cannot remove
(deletes would need tombstones and periodic full rebuilds). IVF also trains in seconds on a
sample and adds 1M x 512 vectors in tens of seconds on two cores (HNSW M=32 takes many minutes
there and adds ~256 bytes of graph per vector), and it has a GPU implementation. Its weakness,
recall that depends on `nprobe`, is measured against exact search (tests/test_ann.py,
bench/gallery_search.py). Centroids go stale as the gallery grows, so the index is retrained
whenever the gallery has grown by `rebuild_growth` since the last training.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np

log = logging.getLogger("rice.index")

ADD_ROWS = 4096  # rows per add to the compressed index (a build, a replay): bounded float32 temporaries


@dataclass(frozen=True)
class AnnConfig:
    """When and how the gallery switches from exact to approximate search."""

    enabled: bool = True
    threshold: int = 200_000  # live items from which unfiltered searches go approximate
    nprobe: int = 32  # inverted lists scanned per query: the recall/latency knob
    nlist: int = 0  # inverted lists; 0 = about 2*sqrt(items), a power of two within [64, 4096]
    rebuild_growth: float = 2.0  # retrain once the gallery is this many times its size at training
    train_points_per_list: int = 64  # k-means sample size = this x nlist (faiss's own guidance: 39-256)
    # Past this many live items the gallery compresses (see `PqBuild`): float16 rows + IVF-PQ
    # shortlist re-scored exactly, instead of float32 rows (+ an IVF-Flat copy of them).
    compress_threshold: int = 200_000
    pq_bytes: int = 64  # PQ code bytes per vector (largest divisor of dim up to this): 64 MB per million
    # Shortlist rows per query re-scored exactly from the float16 rows. It must cover the set of
    # near-equal candidates PQ cannot order: measured on clusters of 244 items (1M over 4096
    # centres, 1280-d), PQ64 recall@10 was 0.58 with 100 rows and 0.997 with 300 (0.85 ms a query).
    rescore: int = 300

    def pq_subquantizers(self, dim: int) -> int:
        """PQ sub-vectors for `dim`: the largest divisor of dim up to `pq_bytes` (one byte each)."""
        return max(m for m in range(1, min(dim, self.pq_bytes) + 1) if dim % m == 0)

    def lists_for(self, n: int) -> int:
        """nlist for a gallery of n items."""
        if self.nlist:
            return self.nlist
        return int(min(4096, max(64, 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n)))))))


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def set_search_threads(threads: int) -> None:
    """Configure faiss (process-wide, native settings) for serving.

    OpenMP threads per faiss call (0 = faiss's default, every core). One per call by default in the
    service: searches already run side by side on the search threads, beside the encoder's own
    threads, and faiss's OpenMP team on a busy CPU spins and waits for cores (measured: a single
    150k x 1280 exact query took 332 ms with 2 OpenMP threads, 75 ms with 1, on the loaded 2-core box).

    Exact search of two or more queries (the search batcher's batches) goes through BLAS, which reads
    the gallery once per block of queries; faiss's default only does so from 128,000 queries and
    otherwise scans the gallery once per query (measured, 150k x 1280, 8 queries: 1,246 ms scanning,
    378 ms through BLAS)."""
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = 2


# Copies a CPU index to where searches run (the GPUs), returning the copy to search. The gallery
# keeps its CPU index as the source of truth (written in place) and re-places it after each write.
IndexPlacer = Callable[[faiss.Index], faiss.Index]


def default_placer() -> IndexPlacer | None:
    """All GPUs (`faiss.index_cpu_to_all_gpus`, sharded over them) when faiss has GPU support and
    sees one; None otherwise: the CPU index is searched in place, with no copy."""
    if not gpu_available():
        return None
    return lambda index: faiss.index_cpu_to_all_gpus(index)


@dataclass
class IvfBuild:
    """One background training run over a snapshot of (slots, vectors)."""

    dim: int
    config: AnnConfig
    slots: np.ndarray  # [N] int64
    vectors: np.ndarray  # [N, D] float32, a copy: the gallery keeps changing meanwhile
    touched: set[int] = field(default_factory=set)  # slots changed since the snapshot
    done: threading.Event = field(default_factory=threading.Event)  # set once swapped in (or failed)

    def run(self) -> faiss.Index:
        """Train on a sample, add every vector; the result lives on the CPU (it is updated in place)."""
        n = len(self.slots)
        nlist = self.config.lists_for(n)
        rng = np.random.default_rng(0)
        sample = self.vectors[rng.choice(n, size=min(n, nlist * self.config.train_points_per_list), replace=False)]
        quantizer = faiss.IndexFlatIP(self.dim)
        # faiss's Python constructor keeps a reference to the quantizer, so it lives as long as the index
        index: faiss.Index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if gpu_available():  # k-means and assignment are the heavy part: do them on the GPU
            res = faiss.StandardGpuResources()
            gpu = faiss.index_cpu_to_gpu(res, 0, index)
            gpu.train(sample)
            index = faiss.index_gpu_to_cpu(gpu)
        else:
            index.train(sample)
        faiss.extract_index_ivf(index).nprobe = self.config.nprobe
        for start in range(0, n, 65536):  # chunks keep the temporary assignment buffers small
            index.add_with_ids(self.vectors[start : start + 65536], self.slots[start : start + 65536])
        log.info("IVF index built: %d vectors, %d lists", n, nlist)
        return index


@dataclass
class PqBuild:
    """One background training run of the compressed index (IVF-PQ) over slots whose vectors are
    read through `rows` (the gallery's float16 store), a chunk at a time: no snapshot copy, so the
    build's extra memory is one chunk plus the codes. A slot rewritten meanwhile may be read half
    written; it is in `touched`, and the gallery re-adds it from the store before the swap.

    Why PQ and not SQ8 (measured at 100k x 1280, bench/million.py): both reach recall@10 0.998+
    once the shortlist is re-scored exactly, but SQ8 keeps 1,280 bytes per vector (1.28 GB per
    million, which with the 2.56 GB float16 rows breaks a 4 GB replica) against PQ's 64."""

    dim: int
    config: AnnConfig
    slots: np.ndarray  # [N] int64
    rows: Callable[[np.ndarray], np.ndarray]  # slots [S] -> float32 [S, D]
    touched: set[int] = field(default_factory=set)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> faiss.Index:
        n = len(self.slots)
        # Half IVF-Flat's lists, 32 training points a list and 10 k-means rounds: the coarse k-means
        # and the assignment of every vector are the whole build cost (O(N x nlist x D)), and at a
        # million 1280-d vectors on one core IVF-Flat's settings take many minutes; with fewer lists
        # the same nprobe scans more codes, which the exact re-scoring turns into recall.
        nlist = self.config.nlist or max(64, self.config.lists_for(n) // 2)
        m = self.config.pq_subquantizers(self.dim)
        rng = np.random.default_rng(0)
        # PQ's 256 centroids per sub-vector want >= 39 x 256 points (faiss's guidance)
        size = min(n, max(nlist * 32, 10_000))
        sample = self.rows(np.sort(self.slots[rng.choice(n, size=size, replace=False)]))
        index: faiss.Index = faiss.IndexIVFPQ(faiss.IndexFlatIP(self.dim), self.dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(index).cp.niter = 10
        index.train(sample)
        del sample
        faiss.extract_index_ivf(index).nprobe = self.config.nprobe
        # 4k rows a call: the float32 rows, their float16 gather and faiss's residuals are 50 MB at
        # 1280-d (16k rows: 200 MB on top of a full gallery); per-call overhead is negligible.
        for start in range(0, n, ADD_ROWS):
            chunk = self.slots[start : start + ADD_ROWS]
            index.add_with_ids(self.rows(chunk), chunk)
        log.info("IVF-PQ index built: %d vectors, %d lists, %d bytes a code", n, nlist, m)
        return index
