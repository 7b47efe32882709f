"""stats["energy_distance"]: the progress statistic of driftloss/_progress.py, on the backend under test.

ED = 2 E_ab d(x, pos) - E_aa d(x, x') - E_bb d(pos, pos') per problem (weighted V-statistic), averaged
over problems, divided by max(S, 1e-3) with normalize=True. Checked against a float64 NumPy formula,
for its properties (>= 0, exactly 0 for identical sets, its known bias at p = q, growth with separation,
invariances, weights as repeated points), and for equality between the paths that return stats.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from backends import HOOKS_AT, B, swap_hooks

import driftloss
from driftloss._backends import backend_for
from driftloss._drift import DriftOptions, reference_drift
from driftloss._fast_drift import fast_drift

F64 = np.float64


def _dist(u, v):
    return np.sqrt(((u[..., :, None, :] - v[..., None, :, :]) ** 2).sum(-1))


def numpy_energy(x, pos, x_w=None, pos_w=None):
    """Mean over problems of the weighted V-statistic energy distance, float64 (raw units)."""
    x, pos = np.asarray(x, F64), np.asarray(pos, F64)
    a = np.ones(x.shape[:-1]) if x_w is None else np.broadcast_to(x_w, x.shape[:-1])
    b = np.ones(pos.shape[:-1]) if pos_w is None else np.broadcast_to(pos_w, pos.shape[:-1])
    ta, tb = a.sum(-1), b.sum(-1)
    cross = np.einsum("...i,...j,...ij->...", a, b, _dist(x, pos)) / (ta * tb)
    within_x = np.einsum("...i,...j,...ij->...", a, a, _dist(x, x)) / ta**2
    within_pos = np.einsum("...i,...j,...ij->...", b, b, _dist(pos, pos)) / tb**2
    return float(np.mean(2 * cross - within_x - within_pos))


def numpy_scale(x, pos, neg=None, x_w=None, pos_w=None, neg_w=None):
    """S of docs/design.md §2 step 2 for x as negatives (the loss's unit), float64."""
    cols = [x] + ([] if neg is None else [neg]) + [pos]
    ws = [np.ones(c.shape[:-1]) if w is None else np.broadcast_to(w, c.shape[:-1])
          for c, w in zip(cols, [x_w] + ([] if neg is None else [neg_w]) + [pos_w])]
    y, w = np.concatenate(cols, axis=-2), np.concatenate(ws, axis=-1)
    return float((_dist(x, y) * w[..., None, :]).sum() / (x.shape[-2] * w.sum()))


def energy(x, pos, neg=None, **kw):
    """stats["energy_distance"] of drifting_loss as a float; x, pos, neg and weights NumPy."""
    arrays = {k: (None if v is None else B.asarray(v, F64)) for k, v in kw.items() if k.endswith("weight")}
    options = {k: v for k, v in kw.items() if not k.endswith("weight")}
    _, stats = B.run(driftloss.drifting_loss, B.asarray(x, F64), B.asarray(pos, F64),
                     None if neg is None else B.asarray(neg, F64), return_stats=True, **arrays, **options)
    value = B.to_numpy(stats["energy_distance"])
    assert value.shape == ()
    return float(value)


def test_hand_computed_one_dimensional():
    # x = {0, 1}, pos = {3}: cross = (3 + 2) / 2, x-x = (0 + 1 + 1 + 0) / 4, pos-pos = 0: ED = 5 - 0.5 = 4.5.
    # S (columns x0, x1, pos; self distances included) = (0 + 1 + 3 + 1 + 0 + 2) / 6 = 7/6.
    x, pos = [[0.0], [1.0]], [[3.0]]
    assert energy(x, pos, normalize=False) == pytest.approx(4.5, rel=1e-12)
    assert energy(x, pos) == pytest.approx(4.5 / (7 / 6), rel=1e-12)
    # neg is not the target: it changes S only
    neg = [[-4.0]]
    s = numpy_scale(np.asarray(x), np.asarray(pos), np.asarray(neg))
    assert energy(x, pos, neg) == pytest.approx(4.5 / s, rel=1e-12)
    assert energy(x, pos, neg, normalize=False) == pytest.approx(4.5, rel=1e-12)


@pytest.mark.parametrize("d", [3, 9])  # exact differences, and the centred Gram form
@pytest.mark.parametrize("x_as_negatives", [True, False])
def test_equals_float64_formula_with_weights_and_problems(d, x_as_negatives):
    rng = np.random.default_rng(d)
    x = rng.normal(size=(2, 3, 7, d)) + 3.0
    pos = rng.normal(size=(2, 3, 5, d)) * 1.5 + 3.5
    neg = rng.normal(size=(2, 3, 4, d))
    x_w, pos_w = rng.uniform(0.5, 2.0, (2, 3, 7)), rng.uniform(0.5, 2.0, (3, 5))  # pos_w broadcasts
    neg_w = rng.uniform(0.0, 2.0, (2, 3, 4))
    want = numpy_energy(x, pos, x_w, pos_w)
    kw = dict(x_weight=x_w, pos_weight=pos_w, neg_weight=neg_w, x_as_negatives=x_as_negatives, problem_dims=2)
    assert energy(x, pos, neg, normalize=False, **kw) == pytest.approx(want, rel=1e-10)
    if x_as_negatives:
        unit = numpy_scale(x, pos, neg, x_w, pos_w, neg_w)
        assert energy(x, pos, neg, **kw) == pytest.approx(want / unit, rel=1e-10)


def test_non_negative_and_zero_for_identical_sets():
    rng = np.random.default_rng(1)
    for seed in range(5):
        x, pos = rng.normal(size=(12, 4)), rng.normal(size=(9, 4)) + 0.1 * seed
        assert energy(x, pos, x_weight=rng.uniform(0.0, 2.0, 12), pos_weight=rng.uniform(0.1, 2.0, 9)) >= 0.0
    # Exact differences (D <= 4) give exactly 0; the centred Gram form (D > 4) leaves coincident x and
    # pos points at a rounding distance of about sqrt(eps) times their spread (here ~1e-8 each).
    for d, tol in ((2, 1e-12), (8, 1e-8)):
        pts = rng.normal(size=(16, d)) + 5.0
        assert abs(energy(pts, pts)) < tol
        assert abs(energy(pts, pts[::-1], normalize=False)) < tol


def test_at_p_equals_q_its_mean_is_the_known_bias():
    """For independent samples of one law it is a V-statistic: E ED = E d(x, x') / N + E d(y, y') / P,
    here E|Y - Y'| = sqrt(pi) for standard normal 2-D points (a Rayleigh distance of scale sqrt(2))."""
    rng = np.random.default_rng(2)
    n, p, seeds = 16, 24, 200
    values = np.array([energy(rng.normal(size=(n, 2)), rng.normal(size=(p, 2)), normalize=False)
                       for _ in range(seeds)])
    bias = np.sqrt(np.pi) * (1 / n + 1 / p)
    assert abs(values.mean() - bias) < 4 * values.std() / np.sqrt(seeds)
    assert values.min() >= 0.0


@pytest.mark.parametrize("normalize", [False, True])
def test_grows_with_separation(normalize):
    """A set against its own translate: 2 mean_ij |x_i + t - x_j| - 2 mean_ij |x_i - x_j| is convex and
    even in t, so it grows with |t| (from exactly 0)."""
    rng = np.random.default_rng(3)
    pos = rng.normal(size=(30, 2))
    x = pos.copy()
    shifts = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    values = [energy(x + [s, 0.0], pos, normalize=normalize) for s in shifts]
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert all(a < b for a, b in zip(values, values[1:])), values
    if not normalize:  # far apart, 2 mean |x_i + t - x_j| grows like 2 |t|
        assert values[-1] - values[-2] == pytest.approx(2 * (8.0 - 4.0), rel=0.05)


def test_invariances():
    rng = np.random.default_rng(4)
    x, pos = rng.normal(size=(11, 3)), rng.normal(size=(13, 3)) + 0.7
    x_w, pos_w = rng.uniform(0.5, 2.0, 11), rng.uniform(0.5, 2.0, 13)
    base = energy(x, pos, x_weight=x_w, pos_weight=pos_w)
    px, pp = rng.permutation(11), rng.permutation(13)
    assert energy(x[px], pos[pp], x_weight=x_w[px], pos_weight=pos_w[pp]) == pytest.approx(base, rel=1e-10)
    shift = np.array([100.0, -50.0, 7.0])
    assert energy(x + shift, pos + shift, x_weight=x_w, pos_weight=pos_w) == pytest.approx(base, rel=1e-8)
    # normalize=True: in units of S, so a common scale changes nothing; raw units scale with it
    assert energy(x * 30.0, pos * 30.0, x_weight=x_w, pos_weight=pos_w) == pytest.approx(base, rel=1e-10)
    raw = energy(x, pos, x_weight=x_w, pos_weight=pos_w, normalize=False)
    assert energy(x * 30.0, pos * 30.0, x_weight=x_w, pos_weight=pos_w, normalize=False) == pytest.approx(
        30.0 * raw, rel=1e-10)
    # the scale of the weights does not matter (raw units: S weighs x's and pos's columns together, so
    # the normalized value is invariant to a common factor only)
    assert energy(x, pos, x_weight=3 * x_w, pos_weight=3 * pos_w) == pytest.approx(base, rel=1e-10)
    assert energy(x, pos, x_weight=3 * x_w, pos_weight=0.5 * pos_w, normalize=False) == pytest.approx(
        raw, rel=1e-10)


def test_weights_equal_repeated_points():
    """A weight k counts as k copies of the point and a weight 0 as none (raw units: S itself weighs
    x's rows equally, so the normalized value of copied rows differs)."""
    rng = np.random.default_rng(5)
    x, pos = rng.normal(size=(6, 2)), rng.normal(size=(5, 2)) + 1.0
    reps_x, reps_pos = np.array([1, 3, 1, 2, 1, 1]), np.array([2, 1, 1, 1, 4])
    copied = energy(np.repeat(x, reps_x, axis=0), np.repeat(pos, reps_pos, axis=0), normalize=False)
    weighted = energy(x, pos, x_weight=reps_x.astype(F64), pos_weight=reps_pos.astype(F64), normalize=False)
    assert weighted == pytest.approx(copied, rel=1e-10)
    keep = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    dropped = energy(x[keep > 0], pos, normalize=False)
    assert energy(x, pos, x_weight=keep, normalize=False) == pytest.approx(dropped, rel=1e-10)


def test_a_problem_without_x_weight_scores_zero():
    rng = np.random.default_rng(6)
    x, pos = rng.normal(size=(2, 5, 2)), rng.normal(size=(2, 4, 2)) + 2.0
    x_w = np.array([[1.0] * 5, [0.0] * 5])
    got = energy(x, pos, x_weight=x_w, normalize=False)
    assert got == pytest.approx(numpy_energy(x[:1], pos[:1]) / 2, rel=1e-10)


def _problem(seed, lead=(3,), n=9, p=7, m=4, d=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*lead, n, d)) + 2.0
    pos = rng.normal(size=(*lead, p, d)) * 1.3 + 2.5
    neg = rng.normal(size=(*lead, m, d))
    w = (rng.uniform(0.5, 2.0, (*lead, n)), rng.uniform(0.0, 2.0, (*lead, m)),
         rng.uniform(0.5, 2.0, (*lead, p)))
    return x, pos, neg, w


@pytest.mark.parametrize("d", [3, 12])
@pytest.mark.parametrize("x_as_negatives", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_blocked_drift_equals_reference(d, x_as_negatives, normalize):
    """fast_drift (NumPy's, torch's and JAX's hook) for every block plan: whole call, whole problems per
    block, rows split (three passes), distances kept or recomputed."""
    x, pos, neg, w = (B.asarray(a, F64) if not isinstance(a, tuple) else tuple(B.asarray(b, F64) for b in a)
                      for a in _problem(7, d=d))
    opts = DriftOptions(taus=(0.05, 0.2), x_as_negatives=x_as_negatives, normalize=normalize, with_stats=True)
    dev = backend_for(B.xp).device
    _, _, ref = reference_drift(x, pos, neg, w, opts, xp=B.xp, matmul=B.xp.matmul, device=dev)
    want = float(B.to_numpy(ref["energy_distance"]))
    assert want == pytest.approx(
        numpy_energy(B.to_numpy(x), B.to_numpy(pos), B.to_numpy(w[0]), B.to_numpy(w[2]))
        / (max(float(B.to_numpy(ref["scale"])), 1e-3) if normalize else 1.0), rel=1e-10)
    for block in (1 << 24, 200, 60, 20):
        for keep in (1 << 24, 0):
            _, _, st = fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=B.xp.matmul, device=dev,
                                  block_elements=block, keep_elements=keep, column_elements=keep)
            assert float(B.to_numpy(st["energy_distance"])) == pytest.approx(want, rel=1e-10), (block, keep)


def test_segments_give_each_group_its_own():
    """Problems in segments (drifting_loss_groups's stacked groups): each segment's value is that of a
    call of its own."""
    x, pos, neg, w = _problem(8, lead=(5,))
    segments = [0, 1, 1, 0, 1]
    opts = DriftOptions(taus=(0.05, 0.2), with_stats=True)
    dev = backend_for(B.xp).device
    cast = (lambda a: B.asarray(a, F64))  # noqa: E731
    _, _, st = fast_drift(cast(x), cast(pos), cast(neg), tuple(cast(a) for a in w), opts, xp=B.xp,
                          matmul=B.xp.matmul, device=dev, segments=segments, block_elements=60)
    for g in (0, 1):
        idx = [i for i, s in enumerate(segments) if s == g]
        points = (cast(x[idx]), cast(pos[idx]), cast(neg[idx]), tuple(cast(a[idx]) for a in w))
        _, _, one = reference_drift(*points, opts, xp=B.xp, matmul=B.xp.matmul, device=dev)
        assert float(B.to_numpy(st["energy_distance"][g])) == pytest.approx(
            float(B.to_numpy(one["energy_distance"])), rel=1e-10)


def test_public_paths_agree():
    """drifting_loss (fast path where the backend has one), the same call on the reference, compiled
    (jax.jit, torch.compile), drift_field's stats, and drifting_loss_groups's per-group stats."""
    x, pos, neg, w = _problem(9, lead=(2,), n=8, p=6, m=3, d=5)
    kw = dict(x_weight=B.asarray(w[0], F64), neg_weight=B.asarray(w[1], F64), pos_weight=B.asarray(w[2], F64))

    def f(x):
        return driftloss.drifting_loss(x, B.asarray(pos, F64), B.asarray(neg, F64), return_stats=True,
                                       **kw)[1]

    def value(stats):
        return float(B.to_numpy(stats["energy_distance"]))

    got = value(f(B.asarray(x, F64)))
    want = numpy_energy(x, pos, w[0], w[2]) / numpy_scale(x, pos, neg, w[0], w[2], w[1])
    assert got == pytest.approx(want, rel=1e-10)
    if HOOKS_AT is not None:
        with pytest.MonkeyPatch.context() as mp:
            swap_hooks(mp, compute_drift=None)
            assert value(f(B.asarray(x, F64))) == pytest.approx(want, rel=1e-10)
    if B.compile is not None:
        compiled = B.compile(lambda a: f(a)["energy_distance"])
        assert float(B.to_numpy(compiled(B.asarray(x, F64)))) == pytest.approx(want, rel=1e-10)
    _, st = driftloss.drift_field(B.asarray(x, F64), B.asarray(pos, F64), B.asarray(neg, F64), (0.05, 0.2),
                                  normalize=True, return_stats=True, **kw)
    assert float(B.to_numpy(st["energy_distance"])) == pytest.approx(want, rel=1e-10)
    # groups [G, n, L, C]: two groups of one shape (stacked on JAX) and one of another
    rng = np.random.default_rng(10)
    gen = {k: rng.normal(size=(2, 8, L, C)) for k, (L, C) in {"a": (3, 4), "b": (3, 4), "c": (2, 6)}.items()}
    real = {k: rng.normal(size=(2, 6, v.shape[2], v.shape[3])) + 0.5 for k, v in gen.items()}
    _, stats = driftloss.drifting_loss_groups({k: B.asarray(v, F64) for k, v in gen.items()},
                                              {k: B.asarray(v, F64) for k, v in real.items()},
                                              return_stats=True)
    for k in gen:
        xs, ps = gen[k].transpose(0, 2, 1, 3), real[k].transpose(0, 2, 1, 3)  # [G, L, n, C]
        want = numpy_energy(xs, ps) / numpy_scale(xs, ps)
        assert float(B.to_numpy(stats[k]["energy_distance"])) == pytest.approx(want, rel=1e-10), k


@pytest.mark.skipif(B.name != "jax", reason="the lax.scan block loop is JAX's")
def test_jax_scan_blocks_under_jit():
    import jax

    jax_fast = importlib.import_module("driftloss.adapters.jax_fast")
    x, pos, neg, w = (jax.numpy.asarray(a) if not isinstance(a, tuple) else tuple(map(jax.numpy.asarray, a))
                      for a in _problem(11, lead=(7,), d=6))
    opts = DriftOptions(taus=(0.05, 0.2), with_stats=True)
    _, _, ref = reference_drift(x, pos, neg, w, opts, xp=B.xp, matmul=B.xp.matmul, device=lambda a: None)
    for block in (2 * 7 * 40, 3 * 40):  # whole problems in scanned blocks; rows split
        def f(x, pos, neg, block=block):
            return fast_drift(x, pos, neg, w, opts, xp=B.xp, matmul=B.xp.matmul, device=lambda a: None,
                              block_elements=block, loop=jax_fast.ORDERED_SCAN_LOOP)[2]["energy_distance"]

        assert float(jax.jit(f)(x, pos, neg)) == pytest.approx(float(ref["energy_distance"]), rel=1e-10)


def test_float32_far_from_the_origin():
    """float32 points 1000 away from the origin: the centred distances keep the statistic accurate."""
    rng = np.random.default_rng(12)
    x, pos = rng.normal(size=(40, 16)) + 1000.0, rng.normal(size=(50, 16)) + 1000.5
    want = numpy_energy(x, pos) / numpy_scale(x, pos)
    _, stats = B.run(driftloss.drifting_loss, B.asarray(x, np.float32), B.asarray(pos, np.float32),
                     return_stats=True)
    assert float(B.to_numpy(stats["energy_distance"])) == pytest.approx(want, rel=2e-3)


def test_cross_replica_sum_averages_over_all_problems():
    """With a replica sum, the mean is over every replica's problems: two replicas holding the same
    problems (the sum doubles every statistic) give the local value."""
    x, pos, neg, w = _problem(13)
    args = [B.asarray(a, F64) for a in (x, pos, neg)]
    local = B.run(driftloss.drifting_loss, *args, return_stats=True)[1]["energy_distance"]
    doubled = driftloss.drifting_loss(*args, return_stats=True, cross_replica_sum=lambda a: 2 * a)[1]
    assert float(B.to_numpy(doubled["energy_distance"])) == pytest.approx(float(B.to_numpy(local)), rel=1e-10)
