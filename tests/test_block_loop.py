"""The block loops of the fast drift (driftloss/_block_loop.py): threaded runs equal the ordered one.

Plain Python bodies here (the loops never look inside a carry); tests/test_fast_path.py checks the
drift computed with blocks on threads against the reference on every backend.
"""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest

from driftloss._block_loop import PYTHON_LOOP, blas_on_one_thread, cpu_threads, threaded_loop


def _body(log):
    """carry + start (a sum), piece [start, start] unless start is a multiple of 3 (piece None)."""
    def body(carry, start):
        log.append((start, threading.get_ident()))
        return carry + start, (None if start % 3 == 0 else [start, start])
    return body


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("blocks", [0, 1, 2, 7, 10])
def test_threaded_run_equals_the_ordered_run(threads, blocks):
    starts = list(range(0, 4 * blocks, 4))  # 0, 4, 8, ...
    carry, pieces = PYTHON_LOOP.run(_body([]), 0, starts, 0)
    log = []
    t_carry, t_pieces = threaded_loop(threads).run(_body(log), 0, starts, 0, lambda a, b: a + b)
    assert (t_carry, t_pieces) == (carry, pieces)
    assert carry == sum(starts) and pieces == [[s, s] for s in starts if s % 3]
    assert sorted(s for s, _ in log) == starts  # every block once
    ran_on = {t for _, t in log}  # the calling thread's run, and the others in the pool
    assert len(ran_on) >= 2 if min(threads, blocks) >= 2 else len(ran_on) <= 1


def test_a_pass_without_combine_runs_in_order_on_the_calling_thread():
    log = []
    carry, _ = threaded_loop(2).run(_body(log), 0, [1, 2, 3, 4], 0)
    assert carry == 10 and [s for s, _ in log] == [1, 2, 3, 4]
    assert {t for _, t in log} == {threading.get_ident()}


@pytest.mark.parametrize("failing", [0, 6])  # on the calling thread / in the pool
def test_an_error_in_any_block_propagates(failing):
    def body(carry, start):
        if start == failing:
            raise ArithmeticError(f"block {start}")
        return carry + start, None

    with pytest.raises(ArithmeticError, match=f"block {failing}"):
        threaded_loop(2).run(body, 0, [0, 2, 4, 6], 0, lambda a, b: a + b)


def test_cpu_threads_reads_the_environment(monkeypatch):
    monkeypatch.setenv("DRIFTLOSS_NUM_THREADS", " 3 ")
    assert cpu_threads() == 3
    monkeypatch.delenv("DRIFTLOSS_NUM_THREADS")
    assert cpu_threads() >= 1
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv("DRIFTLOSS_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="DRIFTLOSS_NUM_THREADS must be a positive integer"):
            cpu_threads()


def test_blas_runs_on_one_thread_inside_a_threaded_call_on_the_main_thread_only():
    """NumPy's BLAS threads are 1 inside ``blas_on_one_thread`` on the main thread and as they were
    after it; on another thread it changes nothing."""
    from threadpoolctl import ThreadpoolController, threadpool_limits

    def blas_threads():
        return {c.num_threads for c in ThreadpoolController().select(user_api="blas").lib_controllers}

    if not blas_threads():
        pytest.skip("no BLAS visible to threadpoolctl")
    with threadpool_limits(2, user_api="blas"):  # a setting to see change, whatever the CPU count
        with blas_on_one_thread():
            inside = blas_threads()
        after, on_other = blas_threads(), []

        def other():
            with blas_on_one_thread():
                on_other.append(blas_threads())

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert (inside, after, on_other) == ({1}, {2}, [{2}])


def _threaded_sum(queue):
    queue.put(threaded_loop(2).run(_body([]), 0, [1, 2, 4, 5], 0, lambda a, b: a + b)[0])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_forked_child_makes_its_own_pool():
    """The parent's pool threads do not exist in a forked child (e.g. data-loader workers): the child
    must not submit to them, or it would wait forever."""
    threaded_loop(2).run(_body([]), 0, [1, 2, 3], 0, lambda a, b: a + b)  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_threaded_sum, args=(queue,))
    child.start()
    child.join(timeout=30)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    assert queue.get(timeout=5) == 12
