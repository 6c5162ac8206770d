"""Copying large host arrays with every core.

One thread copies at about memcpy speed into warm memory, but a copy into fresh memory (an
output buffer XLA just allocated, a page at a time) is bound by page faults, which the
kernel serves in parallel: splitting a large copy over a few threads makes it 1.5-2x
faster on a 2-core machine (``benchmarks/data_planes.py``). numpy releases the GIL while
it copies, so plain threads suffice.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import numpy as np

#: Below this, one thread: handing work to the pool costs more than it saves.
PARALLEL_BYTES = 4 << 20
_THREADS = min(os.cpu_count() or 1, 8)

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(_THREADS, thread_name_prefix="p2j-copy")
        return _pool


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src``, in parallel when large and of one shape and dtype.

    Other pairs (a float64 result narrowed to a float32 buffer without x64, say) are
    assigned as numpy assigns them.
    """
    if (
        _THREADS == 1
        or dst.nbytes < PARALLEL_BYTES
        or not (dst.flags.c_contiguous and src.flags.c_contiguous)
        or dst.shape != src.shape
        or dst.dtype != src.dtype
    ):
        dst[...] = src
        return
    d, s = dst.reshape(-1), src.reshape(-1)
    bounds = np.linspace(0, d.size, _THREADS + 1, dtype=np.int64)
    parts = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    futures = [_executor().submit(np.copyto, d[a:b], s[a:b]) for a, b in parts[1:]]
    a, b = parts[0]
    np.copyto(d[a:b], s[a:b])  # this thread takes a share too
    for f in futures:
        f.result()
