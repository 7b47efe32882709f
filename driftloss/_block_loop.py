"""How ``fast_drift`` runs a pass over its equal-size blocks: in order, or split across threads.

A pass is ``carry, piece = body(carry, start)`` chained over the blocks' starts. The default runs it
as a Python loop of slices; adapters/jax_fast.py runs it as one ``lax.scan``. Eager NumPy runs each
elementwise op on one core, so ``threaded_loop`` hands contiguous runs of blocks to a thread pool
(NumPy releases the GIL inside its loops over a block) and merges the runs' carries with the pass's
``combine``; a pass without one still runs in order.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

Body = Callable[[Any, Any], tuple[Any, Any]]
Combine = Callable[[Any, Any], Any]


def _python_run(body: Body, carry: Any, starts: list[int], axis: int,
                combine: Combine | None = None) -> tuple[Any, list[Any]]:
    """``carry, piece = body(carry, start)`` for each start in order -> (last carry, the pieces).

    Pieces that are None are dropped; the caller concatenates the others along ``axis``.
    """
    pieces = []
    for start in starts:
        carry, piece = body(carry, start)
        if piece is not None:
            pieces.append(piece)
    return carry, pieces


def _python_take(a: Any, start: Any, size: int, axis: int) -> Any:
    """a[start:start + size] along ``axis`` (a view where the backend has views)."""
    return a[(slice(None),) * axis + (slice(start, start + size), ...)]


@dataclass(frozen=True)
class BlockLoop:
    """How ``fast_drift`` runs a pass over equal-size blocks; the default is a Python loop of slices.

    run(body, carry, starts, axis, combine) -> (carry, pieces): ``carry, piece = body(carry, start)``
    over ``starts``, with the pieces (piece None: none) whose concatenation along ``axis`` is that of
    every block's piece, in block order. ``combine(c1, c2)`` (or None) merges the carries of two runs
    of blocks: a loop may then chain runs of blocks separately, each from the given carry, which must
    be combine's identity (zeros for sums). take(a, start, size, axis) is a[start:start + size] along
    ``axis`` for a ``start`` that ``run`` passes to ``body`` (a traced index under JAX's lax.scan).
    after(a, dep) -> a, made to wait for ``dep`` (arrays), or None where the library runs operations
    in the order they are called (eager ones). A compiler (XLA) otherwise orders them as it likes:
    it may run independent blocks and passes side by side, holding their temporaries together, and
    merge a later pass's recomputation of a block's points with an earlier pass's, keeping them alive
    in between (adapters/jax_fast.py).
    """

    run: Callable[..., tuple[Any, list[Any]]] = _python_run
    take: Callable[[Any, Any, int, int], Any] = _python_take
    after: Callable[[Any, Any], Any] | None = None


PYTHON_LOOP = BlockLoop()

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _forget_pools_in_child() -> None:
    """A forked child has none of its parent's pool threads: it makes its own pools on first use
    (submitting to the parent's would wait forever)."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)


def _pool(workers: int) -> ThreadPoolExecutor:
    """One process-wide pool of ``workers`` threads (made on first use)."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="driftloss-blocks")
        return _pools[workers]


_blas_controller: Any = None


@contextlib.contextmanager
def blas_on_one_thread() -> Iterator[None]:
    """NumPy's BLAS on one thread inside the ``with``, when entered on the main thread; else nothing.

    A threaded call's products are small and already run side by side: OpenBLAS threading each of
    them as well oversubscribes the cores (2 cores, 256 problems of D = 64: 85 ms on one thread,
    79 ms on two, 52 ms on two with BLAS on one). The setting is process-wide, and OpenBLAS ignored
    a change made on another thread once the main thread had used it (scipy-openblas 0.3.31), so
    it is changed and restored on the main thread only: a restore that did not take could leave
    the user's BLAS on one thread. Calls on other threads run with the BLAS threads they find.
    """
    global _blas_controller
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _blas_controller is None:
        from threadpoolctl import ThreadpoolController

        _blas_controller = ThreadpoolController()
    with _blas_controller.limit(limits=1, user_api="blas"):
        yield


def _threaded_run(body: Body, carry: Any, starts: list[int], axis: int, combine: Combine | None = None,
                  *, threads: int) -> tuple[Any, list[Any]]:
    """``BlockLoop.run`` over ``threads`` contiguous runs of blocks: the first on the calling thread,
    the others in the pool, their carries combined in block order (so the result does not depend on
    which thread finishes first)."""
    runs = min(threads, len(starts))
    if combine is None or runs < 2:
        return _python_run(body, carry, starts, axis)
    bounds = [len(starts) * i // runs for i in range(runs + 1)]
    chunks = [starts[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    futures = [_pool(threads - 1).submit(_python_run, body, carry, c, axis) for c in chunks[1:]]
    try:
        carry, pieces = _python_run(body, carry, chunks[0], axis)
    finally:  # on an error, let the other runs finish before it propagates (they read the same arrays)
        results = [f.result() if f.exception() is None else None for f in futures]
    for f, got in zip(futures, results, strict=True):
        if got is None:
            raise f.exception()
        carry, pieces = combine(carry, got[0]), pieces + got[1]
    return carry, pieces


def threaded_loop(threads: int) -> BlockLoop:
    """A ``BlockLoop`` whose passes with a ``combine`` split their blocks into ``threads`` runs."""
    return BlockLoop(run=partial(_threaded_run, threads=threads)) if threads > 1 else PYTHON_LOOP


def cpu_threads() -> int:
    """Threads for NumPy's blocks: DRIFTLOSS_NUM_THREADS if set, else the CPUs this process may use."""
    env = os.environ.get("DRIFTLOSS_NUM_THREADS", "").strip()
    if env:
        try:
            threads = int(env)
        except ValueError:
            raise ValueError(f"DRIFTLOSS_NUM_THREADS must be a positive integer; got {env!r}") from None
        if threads < 1:
            raise ValueError(f"DRIFTLOSS_NUM_THREADS must be a positive integer; got {env!r}")
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
