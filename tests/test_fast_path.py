"""The fast drift (driftloss/_fast_drift.py) equals the reference (driftloss/_drift.py), blocked or not.

``fast_drift`` is written on the Array API, so its equality with ``reference_drift`` is checked on
every backend. On torch and JAX the public ``drifting_loss`` dispatches to it through the
``Backend.compute_drift`` hook; there the loss and its gradient are compared with the same call
routed to the reference (eager and compiled), including with small blocks that split problems
and rows. Tolerances (relative): 1e-10 in float64, 1e-5 in float32.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import threading

import numpy as np
import pytest
from backends import HOOKS_AT, B, driftloss_hooks, swap_hooks

from driftloss import drifting_loss
from driftloss._backends import backend_for
from driftloss._block_loop import PYTHON_LOOP, BlockLoop, threaded_loop
from driftloss._drift import DriftOptions
from driftloss._drift import reference_drift as _reference_drift
from driftloss._fast_drift import _neighbour_sums
from driftloss._fast_drift import fast_drift as _fast_drift
from driftloss._kernel import effective_neighbours

TOL = {np.float64: 1e-10, np.float32: 1e-5}
HAS_HOOK = HOOKS_AT is not None
# The module of the backend's block budgets.
FAST = {"torch": "driftloss.adapters.torch_fast", "jax": "driftloss.adapters.jax_fast",
        "numpy": "driftloss._fast_drift"}.get(B.name)
needs_hook = pytest.mark.skipif(not HAS_HOOK, reason=f"{B.name} has no fast-path hook (runs the reference)")


def reference_drift(*args, **kwargs):
    return _reference_drift(*args, device=backend_for(B.xp).device, **kwargs)


def fast_drift(*args, **kwargs):
    return _fast_drift(*args, device=backend_for(B.xp).device, **kwargs)


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _problem(seed, *, lead=(2, 3), n=7, p=5, m=4, d=3, with_neg=True, dtype=np.float64):
    """Random points with an offset (exercises the centring) and random non-negative weights."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*lead, n, d)) + 3.0
    pos = rng.normal(size=(*lead, p, d)) * 1.5 + 3.5
    neg = rng.normal(size=(*lead, m, d)) + 2.0 if with_neg else None
    w = (rng.uniform(0.5, 2.0, (*lead, n)), rng.uniform(0.0, 2.0, (*lead, m)) if with_neg else None,
         rng.uniform(0.5, 2.0, (*lead, p)))
    cast = (lambda a: None if a is None else B.asarray(a, dtype))  # noqa: E731
    return cast(x), cast(pos), cast(neg), tuple(cast(a) for a in w)


OPTION_GRID = [
    dict(kernel=k, affinity_floor=f, x_as_negatives=xn, normalize=nz, attraction=a, repulsion=r,
         with_neg=wn)
    for k, f, xn, nz, (a, r), wn in itertools.product(
        ("both", "y", "none"), (0.0, 1e-6), (True, False), (True, False), ((1.0, 1.0), (1.5, 0.5)),
        (True, False))
    if xn or wn
]


def _options(case, *, stats=False, crs=None):
    taus = (0.02, 0.05, 0.2) if case["normalize"] else (0.5, 1.0)
    return DriftOptions(taus=taus, x_as_negatives=case["x_as_negatives"], normalize=case["normalize"],
                        kernel=case["kernel"], affinity_floor=case["affinity_floor"],
                        attraction=case["attraction"], repulsion=case["repulsion"], with_stats=stats,
                        cross_replica_sum=crs)


def _matmul():
    be = driftloss_hooks() if HAS_HOOK else None
    return (be.matmul if be is not None and be.matmul is not None else B.xp.matmul)


# Block budgets (entries of [problems, T, rows, J]; a row of the default problem has T*J = 48):
# everything in one block, one whole problem per block, one problem split into 3-row blocks.
BLOCKS = (1 << 24, 400, 150)


@pytest.mark.parametrize("case", OPTION_GRID, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_fast_drift_equals_reference_float64(case):
    x, pos, neg, w = _problem(0, with_neg=case["with_neg"])
    opts = _options(case, stats=True)
    v_ref, s_ref, st_ref = reference_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul())
    # column_elements=0: the centred columns made block by block, not once (with whole problems).
    for block, columns in [(b, 1 << 24) for b in BLOCKS] + [(BLOCKS[1], 0)]:
        v, s, st = fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul(), block_elements=block,
                              column_elements=columns)
        assert _rel(B.to_numpy(v), B.to_numpy(v_ref)) < 1e-10, block
        assert float(s) == pytest.approx(float(s_ref), rel=1e-12)
        for key in ("scale", "feature_scale", "drift_rms", "neighbours"):
            assert _rel(B.to_numpy(st[key]), B.to_numpy(st_ref[key])) < 1e-10, (key, block)


# Feature widths of the drift product's three layouts for N = 7 rows, J = 16 columns: the column
# factors on the points (N > D), on the kernel (N <= D < J), and F as one signed product (J <= D).
LAYOUT_WIDTHS = (5, 10, 32)


@pytest.mark.parametrize("d", LAYOUT_WIDTHS)
@pytest.mark.parametrize("case", [c for c in OPTION_GRID if c["with_neg"]],
                         ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_product_layouts_equal_reference_float64(case, d):
    """Each layout of the drift product, for every block plan, with the first pass's distances kept
    for the drift pass or recomputed there (keep_elements=0), the centred columns made once or per
    block (column_elements=0), F kept until lambda is known or, where one product gives it, its
    coefficients (drift_elements=0), and the distances from the augmented product or from x . y plus
    the norms."""
    x, pos, neg, w = _problem(10, n=7, p=5, m=4, d=d)
    opts = _options(case, stats=True)
    v_ref, s_ref, st_ref = reference_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul())
    for block, keep, augment in itertools.product(BLOCKS, (1 << 24, 0), (True, False)):
        v, s, st = fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul(), block_elements=block,
                              keep_elements=keep, column_elements=keep, augment=augment, drift_elements=keep)
        assert _rel(B.to_numpy(v), B.to_numpy(v_ref)) < 1e-10, (block, keep, augment)
        assert float(s) == pytest.approx(float(s_ref), rel=1e-12)
        for key in ("scale", "feature_scale", "drift_rms", "neighbours"):
            assert _rel(B.to_numpy(st[key]), B.to_numpy(st_ref[key])) < 1e-10, (key, block, keep, augment)


@pytest.mark.parametrize("augment", [False, True])
def test_float32_points_far_from_the_origin_are_centred(augment):
    """Points 1000 away from the origin with unit spread: squared norms of 1.6e7 leave float32 about
    one unit of the squared distances (~30) unless the points are centred first, as they are with the
    columns made once and made per block (column_elements=0)."""
    rng = np.random.default_rng(11)
    x64, pos64, neg64 = (rng.normal(size=(3, k, 16)) + 1000.0 for k in (8, 12, 4))
    w64 = (np.ones((3, 8)), np.ones((3, 4)), np.ones((3, 12)))
    opts = DriftOptions(taus=(0.05, 0.2))
    as64 = (B.asarray(x64), B.asarray(pos64), B.asarray(neg64), tuple(B.asarray(a) for a in w64))
    v_ref, _, _ = reference_drift(*as64, opts, xp=B.xp, matmul=_matmul())
    as32 = [B.asarray(a, np.float32) for a in (x64, pos64, neg64)]
    w32 = tuple(B.asarray(a, np.float32) for a in w64)
    for columns in (1 << 24, 0):
        v, _, _ = fast_drift(*as32, w32, opts, xp=B.xp, matmul=_matmul(), block_elements=400,
                             column_elements=columns, augment=augment)
        assert _rel(B.to_numpy(v), B.to_numpy(v_ref)) < 1e-4, columns


@pytest.mark.parametrize("kernel", ["both", "y", "none"])
@pytest.mark.parametrize("floor", [0.0, 1e-6])
def test_fast_drift_equals_reference_float32(kernel, floor):
    x, pos, neg, w = _problem(1, lead=(4,), n=24, p=32, m=8, d=16, dtype=np.float32)
    opts = DriftOptions(taus=(0.02, 0.05, 0.2), kernel=kernel, affinity_floor=floor, with_stats=True)
    v_ref, _, st_ref = reference_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul())
    v_one, _, st_one = fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul())
    v_blk, _, _ = fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul(), block_elements=500)
    assert v_one.dtype == v_ref.dtype
    assert _rel(B.to_numpy(v_one), B.to_numpy(v_ref)) < 1e-5
    assert _rel(B.to_numpy(v_blk), B.to_numpy(v_one)) < 1e-5
    for key in ("drift_rms", "neighbours"):
        assert _rel(B.to_numpy(st_one[key]), B.to_numpy(st_ref[key])) < 1e-5, key


def test_neighbour_sums_equal_effective_neighbours_of_the_normalized_rows():
    """exp(entropy) per row from b and its row sums, with no normalized copy: invariant to each row's
    scale, 0 log 0 = 0 for zero entries, and 1 for an all-zero row, as ``effective_neighbours``."""
    rng = np.random.default_rng(3)
    a = rng.uniform(size=(2, 3, 5, 7)) * (rng.uniform(size=(2, 3, 5, 7)) > 0.3)  # [p, T, rows, J]
    a[0, 1, 2] = 0.0  # an all-zero row
    a[1, 0, 4] = np.eye(7)[3]  # one neighbour exactly
    b = a * 10.0 ** rng.uniform(-20, 3, size=(2, 3, 5, 1))  # rows at scales from 1e-20 to 1e3

    def sums(b):
        return B.to_numpy(_neighbour_sums(B.asarray(b), B.xp, B.asarray(b.sum(axis=-1, keepdims=True))))

    got = sums(b)
    want = np.array([[5 * float(B.to_numpy(effective_neighbours(B.asarray(a[i, t]), xp=B.xp)))
                      for t in range(3)] for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-10)
    row = a[1, 2, 0] / a[1, 2, 0].sum()  # one row by hand
    nz = row[row > 0]
    np.testing.assert_allclose(sums(a[1:2, 2:3, :1])[0, 0], np.exp(-np.sum(nz * np.log(nz))), rtol=1e-12)


@pytest.mark.parametrize("kernel", ["both", "y", "none"])
def test_stats_with_zero_weights_equal_reference(kernel):
    """Columns of weight 0 (b = K w = 0 there, log w = -inf) leave the entropies of the statistics,
    taken from log K in closed form, equal to the reference's, for every block plan."""
    x, pos, neg, w = _problem(13, lead=(2, 3))
    w_np = [B.to_numpy(a).copy() for a in w]
    w_np[1][..., ::2] = 0.0  # every other negative
    w_np[2][0, 1, :] = 0.0  # one problem's positives all
    w = tuple(B.asarray(a) for a in w_np)
    opts = DriftOptions(taus=(0.02, 0.05, 0.2), kernel=kernel, with_stats=True)
    v_ref, _, st_ref = reference_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul())
    for block in BLOCKS:
        v, _, st = fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul(), block_elements=block)
        assert _rel(B.to_numpy(v), B.to_numpy(v_ref)) < 1e-10, block
        for key in ("drift_rms", "neighbours"):
            assert np.all(np.isfinite(B.to_numpy(st[key])))
            assert _rel(B.to_numpy(st[key]), B.to_numpy(st_ref[key])) < 1e-10, (key, block)


def test_blocked_equals_unblocked_with_coincident_points_and_one_sample():
    """Duplicated points (zero distances off the diagonal) and N = 1 with extra negatives.

    A zero distance from the Gram form is sqrt of a rounding residue (~1e-8 in float64) that
    depends on the centring and the block shape, hence 1e-7 for the duplicated points.
    """
    rng = np.random.default_rng(2)
    base = rng.normal(size=(3, 6, 4))
    x = B.asarray(np.concatenate([base, base[:, :2]], axis=1))  # 8 rows, two repeated
    pos = B.asarray(np.concatenate([base[:, :3], rng.normal(size=(3, 5, 4))], axis=1))
    ones = (B.asarray(np.ones((3, 8))), None, B.asarray(np.ones((3, 8))))
    opts = DriftOptions(taus=(0.02, 0.05, 0.2))
    v_ref, _, _ = reference_drift(x, pos, None, ones, opts, xp=B.xp, matmul=_matmul())
    for block in BLOCKS:
        v, _, _ = fast_drift(x, pos, None, ones, opts, xp=B.xp, matmul=_matmul(), block_elements=block)
        assert np.all(np.isfinite(B.to_numpy(v)))
        assert _rel(B.to_numpy(v), B.to_numpy(v_ref)) < 1e-7
    x1, neg1 = B.asarray(rng.normal(size=(2, 1, 4))), B.asarray(rng.normal(size=(2, 3, 4)))
    pos1 = B.asarray(rng.normal(size=(2, 2, 4)))
    w1 = (B.asarray(np.ones((2, 1))), B.asarray(np.ones((2, 3))), B.asarray(np.ones((2, 2))))
    v_ref, _, _ = reference_drift(x1, pos1, neg1, w1, opts, xp=B.xp, matmul=_matmul())
    for block in BLOCKS:
        v, _, _ = fast_drift(x1, pos1, neg1, w1, opts, xp=B.xp, matmul=_matmul(), block_elements=block)
        assert _rel(B.to_numpy(v), B.to_numpy(v_ref)) < 1e-10


@pytest.mark.parametrize("d", [2, 8])  # exact differences, and the product of augmented points
def test_memory_is_bounded_by_the_block_when_rows_are_split(d):
    """N = 2048, J = 4096: one [N, J] float64 array is 64 MiB (a bool mask 8 MiB); with 8-row blocks
    every temporary is [8, J], and the traced peak stays under 4 MiB (NumPy reports to tracemalloc)."""
    if B.name != "numpy":
        pytest.skip("allocations are traced on NumPy; the blocked code is the same on every backend")
    import tracemalloc

    rng = np.random.default_rng(11)
    x, pos = rng.normal(size=(2048, d)), rng.normal(size=(2048, d)) + 0.5
    ones = (np.ones(2048), None, np.ones(2048))
    opts = DriftOptions(taus=(0.05,))
    tracemalloc.start()
    try:
        v, _, _ = fast_drift(x, pos, None, ones, opts, xp=B.xp, matmul=_matmul(), block_elements=8 * 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert v.shape == (2048, d) and np.all(np.isfinite(v))
    assert peak < 4 * 2**20, peak


THREAD_CASES = [c for c in OPTION_GRID if c["affinity_floor"] == 0.0 and c["normalize"]]


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("case", THREAD_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_blocks_on_threads_equal_reference(case, threads):
    """Blocks split across threads (NumPy's loop) give the reference's drift and statistics for every
    block plan: whole problems (the distances kept or recomputed), rows split (column minima merged
    across threads), and segments."""
    x, pos, neg, w = _problem(12, lead=(2, 5), with_neg=case["with_neg"])
    opts = _options(case, stats=True)
    v_ref, s_ref, st_ref = reference_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul())
    threaded, idents = threaded_loop(threads), set()

    def run(body, carry, starts, axis, combine=None):  # the threaded loop, noting where blocks ran
        def noted(c, start):
            idents.add(threading.get_ident())
            return body(c, start)
        return threaded.run(noted, carry, starts, axis, combine)

    loop = BlockLoop(run=run)
    for block, keep in itertools.product(BLOCKS, (1 << 24, 0)):
        v, s, st = fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul(), block_elements=block,
                              keep_elements=keep, loop=loop)
        assert _rel(B.to_numpy(v), B.to_numpy(v_ref)) < 1e-10, (block, keep)
        assert float(s) == pytest.approx(float(s_ref), rel=1e-12)
        for key in ("scale", "feature_scale", "drift_rms", "neighbours"):
            assert _rel(B.to_numpy(st[key]), B.to_numpy(st_ref[key])) < 1e-10, (key, block, keep)
    assert len(idents) >= 2  # the calling thread and the pool's
    runs = [0, 1, 0, 2, 1, 2, 2, 0, 1, 1]  # segment of each of the 2*5 problems
    for block in BLOCKS:
        v_one, s_one, _ = fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul(), block_elements=block,
                                     segments=runs)
        v, s, _ = fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul(), block_elements=block,
                             segments=runs, loop=loop)
        assert _rel(B.to_numpy(v), B.to_numpy(v_one)) < 1e-12, block
        assert _rel(B.to_numpy(s), B.to_numpy(s_one)) < 1e-12, block


def test_cross_replica_sum_matches_reference():
    """Two identical replicas (sum = 2x) give the single-device drift on both paths."""
    x, pos, neg, w = _problem(3)
    calls = []

    def twice(a):
        calls.append(tuple(a.shape))
        return a + a

    opts = DriftOptions(taus=(0.02, 0.05, 0.2), cross_replica_sum=twice)
    v_ref, _, _ = reference_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul())
    v, _, _ = fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul(), block_elements=20)
    assert calls and _rel(B.to_numpy(v), B.to_numpy(v_ref)) < 1e-10


SEGMENT_CASES = [c for c in OPTION_GRID if c["attraction"] == 1.0 and c["x_as_negatives"] and c["with_neg"]]


@pytest.mark.parametrize("d", [3, 32])
@pytest.mark.parametrize("case", SEGMENT_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_segments_equal_separate_calls(case, d):
    """Problems in G segments (interleaved, as drifting_loss_groups stacks groups along their
    locations) give each segment the drift, s and stats of a call of its own, for every block plan
    (blocks that straddle segments, one problem per block, rows split); at d = 32 > J with F's
    coefficients kept in place of F (drift_elements=0)."""
    x, pos, neg, w = _problem(5, lead=(2, 3), d=d, with_neg=case["with_neg"])
    opts = _options(case, stats=True)
    runs = [0, 1, 0, 2, 1, 2]  # segment of each of the 2*3 problems (row-major)

    def problems(a, idx):  # the chosen problems of a [2, 3, ...] as [k, ...]
        a = B.to_numpy(a)
        return B.asarray(a.reshape(6, *a.shape[2:])[idx], np.float64)

    for block in (*BLOCKS, 2 * 7 * 3 * 16):  # the last: two whole problems per block
        v, s, st = fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul(), block_elements=block,
                              segments=runs, drift_elements=0)
        v = B.to_numpy(v).reshape(6, 7, d)
        for g in range(3):
            idx = [i for i, r in enumerate(runs) if r == g]
            args = [None if a is None else problems(a, idx) for a in (x, pos, neg)]
            wg = tuple(None if a is None else problems(a, idx) for a in w)
            v_g, s_g, st_g = reference_drift(*args, wg, opts, xp=B.xp, matmul=_matmul())
            assert _rel(v[idx], B.to_numpy(v_g)) < 1e-10, (block, g)
            assert float(B.to_numpy(s)[g] if case["normalize"] else s) == pytest.approx(float(s_g), rel=1e-12)
            for key in ("scale", "feature_scale", "drift_rms", "neighbours"):
                assert _rel(B.to_numpy(st[key])[g], B.to_numpy(st_g[key])) < 1e-10, (key, block, g)


def test_segments_are_checked():
    x, pos, neg, w = _problem(6, lead=(3,))
    opts = DriftOptions(taus=(0.05,))
    for bad, match in (([0, 1], "each of the 3 problems"), ([0, 2, 0], "segment 1 has no problems"),
                       ([0, -1, 0], "each of the 3 problems")):
        with pytest.raises(ValueError, match=match):
            fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul(), segments=bad)


# ---- the public loss on torch / JAX: dispatch, loss and gradient against the reference ----------

def _on_reference(fn):
    """fn() with the backend's fast path switched off (its hooks without compute_drift)."""
    with pytest.MonkeyPatch.context() as mp:
        swap_hooks(mp, compute_drift=None)
        return fn()


def _loss_fn(pos, neg, w, **options):
    x_w, neg_w, pos_w = w
    return lambda x: drifting_loss(x, pos, neg, x_weight=x_w, neg_weight=neg_w, pos_weight=pos_w,
                                   problem_dims=x.ndim - 2, xp=B.xp, **options)


def _loss_and_grad(f, x, compiled=False):
    """(loss, gradient) as NumPy; the gradient is that of d loss / d x = -2 V / (s x.size) (NumPy
    has no autodiff: compared through the loss, and V is compared in the tests above)."""
    g = B.compile(f) if compiled and B.has_autodiff else f
    return B.to_numpy(g(x)), (B.to_numpy(B.grad(g, x)) if B.has_autodiff else np.zeros(1))


@needs_hook
def test_public_loss_dispatches_to_fast_path():
    hook, seen = driftloss_hooks().compute_drift, []

    def spy(*args, **kwargs):
        seen.append(True)
        return hook(*args, **kwargs)

    x, pos, neg, w = _problem(4)
    with pytest.MonkeyPatch.context() as mp:
        swap_hooks(mp, compute_drift=spy)
        drifting_loss(x, pos, neg, problem_dims=2, xp=B.xp)
    assert seen


def test_cpu_block_budget(monkeypatch):
    """Small problems are grouped up to the cache budget; a larger one stays whole up to the block
    budget (no recomputed distances); beyond that its rows are split into blocks of the split budget."""
    if B.name not in ("torch", "numpy"):
        pytest.skip("the CPU block rule is for eager libraries (benchmarks/RESULTS.md)")
    fast = importlib.import_module(FAST)
    x, pos, neg, w = _problem(6)  # [2, 3] problems x 7 rows x 16 columns x 1 tau = 112 entries each
    opts = DriftOptions(taus=(0.05,))
    kw = dict(xp=B.xp, matmul=_matmul(), device=backend_for(B.xp).device)
    compute = fast.compute_drift if B.name == "torch" else fast.cpu_compute_drift
    budgets = []

    def spy(*args, block_elements, **kwargs):
        budgets.append(block_elements)
        return _fast_drift(*args, block_elements=block_elements, **kwargs)

    monkeypatch.setattr(fast, "fast_drift", spy)
    v_ref, _, _ = reference_drift(x, pos, neg, w, opts, xp=B.xp, matmul=kw["matmul"])
    for cache, block, split, expected in ((224, 1000, 30, 224), (100, 1000, 30, 112), (50, 60, 30, 30)):
        monkeypatch.setattr(fast, "CPU_CACHE_ELEMENTS", cache)
        monkeypatch.setattr(fast, "CPU_BLOCK_ELEMENTS", block)
        monkeypatch.setattr(fast, "CPU_SPLIT_ELEMENTS", split)
        v, _, _ = compute(x, pos, neg, w, opts, **kw)
        assert budgets[-1] == expected
        assert _rel(B.to_numpy(v), B.to_numpy(v_ref)) < 1e-10


def test_numpy_blocks_split_across_threads(monkeypatch):
    """NumPy's hook splits the blocks of a call across DRIFTLOSS_NUM_THREADS threads, up to one
    thread per cache budget of the call's entries; a smaller call runs on one thread."""
    if B.name != "numpy":
        pytest.skip("NumPy's hook (torch and JAX thread their own operations)")
    fast = importlib.import_module(FAST)
    x, pos, neg, w = _problem(7, lead=(2, 5))  # 10 problems x 7 rows x 16 columns x 1 tau: 1120 entries
    opts = DriftOptions(taus=(0.05,))
    loops = []

    def spy(*args, loop, **kwargs):
        loops.append(loop)
        return _fast_drift(*args, loop=loop, **kwargs)

    monkeypatch.setattr(fast, "fast_drift", spy)
    v_ref, _, _ = reference_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul())
    # (threads asked, cache budget, threads used): 1120 // 448 = 2 threads at most, 1120 // 600 = 1.
    for asked, cache, used in ((2, 448, 2), (3, 448, 2), (3, 224, 3), (1, 448, 1), (2, 600, 1)):
        monkeypatch.setenv("DRIFTLOSS_NUM_THREADS", str(asked))
        monkeypatch.setattr(fast, "CPU_CACHE_ELEMENTS", cache)
        v, _, _ = fast.cpu_compute_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul(),
                                         device=backend_for(B.xp).device)
        threads = 1 if loops[-1] is PYTHON_LOOP else loops[-1].run.keywords["threads"]
        assert threads == used, (asked, cache)
        assert _rel(B.to_numpy(v), B.to_numpy(v_ref)) < 1e-10


# The accelerator plan's settings, per backend: (block budget, columns made once, F kept).
ACCELERATOR_SETTINGS = {"torch": ("CUDA_BLOCK_ELEMENTS", "COLUMN_ELEMENTS", "DRIFT_ELEMENTS"),
                        "jax": ("ACCELERATOR_BLOCK_ELEMENTS", "ACCELERATOR_COLUMN_ELEMENTS",
                                "ACCELERATOR_DRIFT_ELEMENTS")}


@pytest.mark.parametrize("per_block", [False, True], ids=["whole-columns", "per-block-columns"])
def test_accelerator_plan_equals_reference(monkeypatch, per_block):
    """On the accelerator plan (torch on CUDA, JAX on GPUs and TPUs; forced here on the CPU) the budget
    bounds [problems, T, rows, J] and, for points wider than the J columns, [problems, T, rows, D]
    too: scaled by J / D. With small thresholds the centred columns are made per block and the kernel's
    coefficients kept in place of F (for D > J), V made from them block by block where a loop's run
    of blocks comes back as one piece (JAX's scan); the drift equals the reference either way."""
    if B.name not in ACCELERATOR_SETTINGS:
        pytest.skip(f"{B.name} has no accelerator plan")
    fast = importlib.import_module(FAST)
    opts = DriftOptions(taus=(0.05, 0.2))
    kw = dict(xp=B.xp, matmul=_matmul(), device=backend_for(B.xp).device)
    budgets, calls = [], []

    def spy(*args, block_elements, **kwargs):
        budgets.append(block_elements)
        calls.append(kwargs)
        return _fast_drift(*args, block_elements=block_elements, **kwargs)

    block, columns, drift = ACCELERATOR_SETTINGS[B.name]
    monkeypatch.setattr(fast, "fast_drift", spy)
    monkeypatch.setattr(fast, "block_plan", lambda a: "accelerator")
    monkeypatch.setattr(fast, block, 2000)
    if per_block:
        monkeypatch.setattr(fast, columns, 0)
        monkeypatch.setattr(fast, drift, 0)
    # J = 7 + 4 + 5 = 16 columns; 2 temperatures x 7 rows x 16 = 224 entries per problem
    for d, expected, lead in ((3, 2000, (2, 3)), (16, 2000, (2, 3)), (32, 1000, (2, 3)), (40, 800, (2, 3)),
                              (40, 800, (11,))):  # d = 40: blocks of 3 problems (11: and a remainder)
        x, pos, neg, w = _problem(7, d=d, lead=lead)
        v_ref, _, _ = reference_drift(x, pos, neg, w, opts, xp=B.xp, matmul=kw["matmul"])
        v, _, _ = fast.compute_drift(x, pos, neg, w, opts, **kw)
        assert budgets[-1] == expected
        assert (calls[-1]["column_elements"], calls[-1]["drift_elements"]) == (
            (0, 0) if per_block else (getattr(fast, columns), getattr(fast, drift)))
        assert _rel(B.to_numpy(v), B.to_numpy(v_ref)) < 1e-10


@pytest.mark.skipif(B.name != "torch", reason="torch's one-pass operations")
def test_torch_accelerator_ops_equal_their_array_api_forms(monkeypatch):
    """The accelerator plan's one-pass sums of squares (a vector norm; forced on the CPU) and centred
    concatenation (written into the result's rows; the Array API form under torch.func, which takes no
    out=) equal the two-pass forms."""
    import torch

    torch_fast = importlib.import_module("driftloss.adapters.torch_fast")
    monkeypatch.setattr(torch_fast, "one_pass_squares", lambda a: True)
    ops = torch_fast.ACCELERATOR_OPS
    rng = np.random.default_rng(4)
    parts = [torch.tensor(rng.normal(size=(3, 4, 5))), torch.tensor(rng.normal(size=(3, 5, 2))).mT,
             torch.tensor(rng.normal(size=(3, 6, 5)))]  # the second one strided
    centre = torch.tensor(rng.normal(size=(3, 1, 5)))
    want = torch.cat(parts, dim=-2) - centre
    assert torch.equal(ops.centred_concat(B.xp, parts, centre), want)
    batched = torch.func.vmap(lambda a, b, c, m: ops.centred_concat(B.xp, [a, b, c], m))(*parts, centre)
    assert torch.equal(batched, want)
    a = torch.tensor(rng.normal(size=(2, 3, 4, 5)))
    for axis, keepdims in ((-1, True), ((2, 3), False), (-2, True)):
        torch.testing.assert_close(ops.sum_squares(B.xp, a, axis, keepdims),
                                   torch.sum(a * a, dim=axis, keepdim=keepdims), rtol=1e-14, atol=0)


CASES = [
    dict(),
    dict(kernel="y"),
    dict(kernel="none", normalize=False, taus=(0.5, 1.0)),
    dict(affinity_floor=1e-6),
    dict(attraction=1.5, repulsion=0.5),
    dict(x_as_negatives=False),
    dict(normalize=False, taus=0.3),
    dict(reduction="none"),
]


@needs_hook
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "-")
def test_public_loss_and_gradient_equal_reference(options, dtype):
    x, pos, neg, w = _problem(5, lead=(3,), n=12, p=16, m=5, d=8, dtype=dtype)
    options = dict(options)
    reduce = options.get("reduction") == "none"
    f = _loss_fn(pos, neg, w, **options)
    scalar = (lambda x: B.xp.sum(f(x))) if reduce else f
    loss, grad = _loss_and_grad(scalar, x)
    loss_ref, grad_ref = _on_reference(lambda: _loss_and_grad(scalar, x))
    assert np.isfinite(loss) and _rel(loss, loss_ref) < TOL[dtype]
    assert _rel(grad, grad_ref) < TOL[dtype]
    if reduce:
        assert _rel(B.to_numpy(f(x)), _on_reference(lambda: B.to_numpy(f(x)))) < TOL[dtype]


@needs_hook
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_blocked_public_loss_equals_unblocked_eager_and_compiled(dtype):
    """Small blocks (rows split, three passes) give the unblocked loss and gradient, also compiled."""
    x, pos, neg, w = _problem(6, lead=(2,), n=10, p=8, m=3, d=5, dtype=dtype)
    f = _loss_fn(pos, neg, w, return_stats=False)
    loss, grad = _loss_and_grad(f, x)
    fast = importlib.import_module(FAST)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("CPU_CACHE_ELEMENTS", "CPU_BLOCK_ELEMENTS", "CPU_SPLIT_ELEMENTS", "CUDA_BLOCK_ELEMENTS",
                     "ACCELERATOR_BLOCK_ELEMENTS"):
            if hasattr(fast, name):
                mp.setattr(fast, name, 3 * 21 * 5)  # 5 of 10 rows per block
        loss_b, grad_b = _loss_and_grad(f, x)
        loss_c, grad_c = _loss_and_grad(_loss_fn(pos, neg, w), x, compiled=True)
    loss_ref, grad_ref = _on_reference(lambda: _loss_and_grad(f, x))
    for lo, gr in ((loss, grad), (loss_b, grad_b), (loss_c, grad_c)):
        assert _rel(lo, loss_ref) < TOL[dtype] and _rel(gr, grad_ref) < TOL[dtype]


@needs_hook
def test_stats_equal_reference():
    x, pos, neg, w = _problem(7)
    f = _loss_fn(pos, neg, w, return_stats=True)
    loss, st = f(x)
    loss_ref, st_ref = _on_reference(lambda: f(x))
    assert _rel(B.to_numpy(loss), B.to_numpy(loss_ref)) < 1e-10
    assert set(st) == set(st_ref)
    for key in st:
        assert _rel(B.to_numpy(st[key]), B.to_numpy(st_ref[key])) < 1e-10, key


@pytest.mark.skipif(B.name != "jax", reason="jax.vmap is JAX-only")
def test_fast_path_under_vmap_equals_reference():
    import jax

    x, pos, neg, w = _problem(8, lead=(4,), n=9, p=6, m=3, d=4)
    f = jax.jit(jax.vmap(jax.value_and_grad(lambda x, p, q: drifting_loss(x, p, q, xp=B.xp))))
    loss, grad = f(x, pos, neg)
    loss_ref, grad_ref = _on_reference(
        lambda: jax.vmap(jax.value_and_grad(lambda x, p, q: drifting_loss(x, p, q, xp=B.xp)))(x, pos, neg))
    assert _rel(loss, loss_ref) < 1e-10 and _rel(grad, grad_ref) < 1e-10


@pytest.mark.skipif(B.name != "jax", reason="the lax.scan block loop is JAX's")
@pytest.mark.parametrize("case", [
    dict(kernel="both"), dict(kernel="both", x_as_negatives=False), dict(kernel="y", affinity_floor=1e-6),
    dict(kernel="none", normalize=False)], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_jax_scan_blocks_under_jit_equal_reference(case):
    """The scan over equal blocks plus a remainder block, jitted: 7 problems in blocks of 2 (3 scanned +
    1), and rows split 3 + 3 + 1 per problem (three passes); the jaxpr holds scans, not unrolled blocks.
    With the columns made per block, each pass's blocks wait for the previous pass (``after``, here
    also for an outside array holding a NaN, which must not reach the result)."""
    import jax
    import jax.numpy as jnp

    jax_fast = importlib.import_module(FAST)
    x, pos, neg, w = _problem(9, lead=(7,))  # N = 7, J = 16 or 9 (no x columns)
    full = dict(kernel="both", affinity_floor=0.0, x_as_negatives=True, normalize=True, attraction=1.5,
                repulsion=0.5)
    opts = _options({**full, **case}, stats=True)
    v_ref, s_ref, st_ref = reference_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul())
    row = len(opts.taus) * (pos.shape[-2] + neg.shape[-2] + (7 if opts.x_as_negatives else 0))
    for block, columns in itertools.product((2 * 7 * row, 3 * row), (1 << 24, 0)):
        def f(x, pos, neg, block=block, columns=columns):
            return _fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=_matmul(), device=lambda a: None,
                               block_elements=block, loop=jax_fast.ORDERED_SCAN_LOOP, column_elements=columns,
                               after=(jnp.asarray([1.0, jnp.nan]),))

        assert "scan" in str(jax.make_jaxpr(f)(x, pos, neg))
        v, s, st = jax.jit(f)(x, pos, neg)
        assert _rel(v, v_ref) < 1e-10, (block, columns)
        assert _rel(s, s_ref) < 1e-12
        for key in ("scale", "feature_scale", "drift_rms", "neighbours"):
            assert _rel(st[key], st_ref[key]) < 1e-10, (key, block)


@pytest.mark.skipif(B.name != "jax", reason="XLA's memory plan")
def test_xla_plan_holds_one_group_evaluation_at_a_time(monkeypatch):
    """XLA runs independent work side by side and holds its temporaries together. On the accelerator
    plan (compiled here on the CPU), drifting_loss_groups's evaluations wait each for the one before
    (``Backend.after``), and within a call each pass's per-block points wait for the pass before
    (``BlockLoop.after``): the loss and gradient of four groups evaluated one by one plan about the
    temporaries of one group, and clearly more without the ordering."""
    import jax
    from driftloss.adapters import jax as jax_adapter

    import driftloss

    jax_fast = importlib.import_module(FAST)
    rng = np.random.default_rng(3)
    groups = 4
    # [n, L, C] per group; each group's blocks: problems of 8 x 3 temperatures x 8 rows x 28 columns
    gen = {str(k): B.asarray(rng.normal(size=(8, 16, 256)), np.float32) for k in range(groups)}
    pos = {k: B.asarray(rng.normal(size=(16, 16, 256)), np.float32) for k in gen}
    neg = {k: B.asarray(rng.normal(size=(4, 16, 256)), np.float32) for k in gen}
    monkeypatch.setattr(jax_fast, "block_plan", lambda a: "accelerator")  # the plan ordered
    monkeypatch.setattr(jax_fast, "ACCELERATOR_COLUMN_ELEMENTS", 0)
    monkeypatch.setattr(jax_adapter, "BACKEND", dataclasses.replace(jax_adapter.BACKEND, stack_elements=1))

    def temporaries(names):
        def loss(gen):
            return driftloss.drifting_loss_groups(gen, {k: pos[k] for k in names}, {k: neg[k] for k in names})

        args = {k: gen[k] for k in names}
        return jax.jit(jax.grad(loss)).lower(args).compile().memory_analysis().temp_size_in_bytes

    ordered_one, ordered_all = temporaries(["0"]), temporaries(list(gen))
    monkeypatch.setattr(jax_adapter, "BACKEND", dataclasses.replace(jax_adapter.BACKEND, after=None))
    monkeypatch.setattr(jax_fast, "ORDERED_SCAN_LOOP", jax_fast.SCAN_LOOP)
    unordered_all = temporaries(list(gen))
    # jax 0.10.2: 1.01x and 1.62x one group's
    assert ordered_all < 1.2 * ordered_one, (ordered_one, ordered_all)
    assert unordered_all > 1.4 * ordered_one, (ordered_one, unordered_all)


@pytest.mark.skipif(B.name != "jax", reason="JAX's accelerator plan")
@pytest.mark.parametrize("stack_elements", [None, 1], ids=["stacked", "one-by-one"])
def test_jax_accelerator_plan_groups_equal_reference(monkeypatch, stack_elements):
    """drifting_loss_groups on JAX's accelerator plan (forced on the CPU; small blocks, per-block
    columns, kept coefficients, evaluations and passes ordered, scans' outputs made in order): loss
    and gradient under jit equal the reference core's, the groups stacked into one evaluation or not."""
    import jax
    from driftloss.adapters import jax as jax_adapter

    import driftloss

    jax_fast = importlib.import_module(FAST)
    rng = np.random.default_rng(5)
    gen = {str(k): B.asarray(rng.normal(size=(6, 2 + k, 40)) + 1.0) for k in range(3)}  # [n, L, C]
    pos = {k: B.asarray(rng.normal(size=(7, a.shape[1], 40))) for k, a in gen.items()}
    neg = {k: B.asarray(rng.normal(size=(3, a.shape[1], 40)) - 1.0) for k, a in gen.items()}

    def loss(gen):
        return driftloss.drifting_loss_groups(gen, pos, neg, taus=(0.05, 0.2), neg_weight=B.asarray(
            np.full(3, 1.5)))

    expected = _on_reference(lambda: jax.value_and_grad(loss)(gen))
    monkeypatch.setattr(jax_fast, "block_plan", lambda a: "accelerator")
    # J = 16 columns, D = 40: the budget scaled by J / D holds 2 problems (2 taus x 6 rows x 16) a block
    monkeypatch.setattr(jax_fast, "ACCELERATOR_BLOCK_ELEMENTS", 2 * (2 * 6 * 16) * 40 // 16)
    monkeypatch.setattr(jax_fast, "ACCELERATOR_COLUMN_ELEMENTS", 0)
    monkeypatch.setattr(jax_adapter, "BACKEND", dataclasses.replace(jax_adapter.BACKEND,
                                                                    stack_elements=stack_elements))
    got = jax.jit(jax.value_and_grad(loss))(gen)
    assert _rel(got[0], expected[0]) < 1e-10
    for k in gen:
        assert _rel(got[1][k], expected[1][k]) < 1e-10, k
