"""Values: hand-computed tiny cases and the float64 reference of docs/design.md §2, on the tested backend."""

import math

import numpy as np
import pytest
from backends import B
from reference_loss import reference_drift, reference_loss_and_grad

import driftloss

F64 = np.float64


def test_hand_computed_one_positive_one_negative():
    # x = 0, pos = +1, neg = -1, row softmax over two equal distances: A+ = A- = 1/2,
    # c+ = c- = 1/4, V = 1/4 * (1 - 0) - 1/4 * (-1 - 0) = 1/2.
    x, p, q = (B.asarray([[v]], F64) for v in (0.0, 1.0, -1.0))
    v = driftloss.drift_field(x, p, q, 1.0, x_as_negatives=False, kernel="y")
    np.testing.assert_allclose(B.to_numpy(v), [[0.5]], rtol=1e-14)


def test_hand_computed_both_normalization_with_self_exclusion():
    # x = {0, 3}, pos = {1} in 1-D, tau = 1, raw coordinates. Columns [x0, x1, p].
    # S = (0+3+1 + 3+0+2) / 6 = 1.5, so the self penalty is 150 (100 mean distances).
    x = B.asarray([[0.0], [3.0]], F64)
    p = B.asarray([[1.0]], F64)
    e = math.exp
    d = [[150.0, 3.0, 1.0], [3.0, 150.0, 2.0]]
    row = [[e(-v) / sum(e(-u) for u in r) for v in r] for r in d]
    col = [[e(-d[i][j]) / (e(-d[0][j]) + e(-d[1][j])) for j in range(3)] for i in range(2)]
    A = [[math.sqrt(row[i][j] * col[i][j]) for j in range(3)] for i in range(2)]
    ys = [0.0, 3.0, 1.0]
    want = []
    for i, xi in enumerate((0.0, 3.0)):
        s_neg, s_pos = A[i][0] + A[i][1], A[i][2]
        want.append([s_neg * A[i][2] * (1.0 - xi) - s_pos * sum(A[i][j] * (ys[j] - xi) for j in (0, 1))])
    v = driftloss.drift_field(x, p, None, 1.0)
    np.testing.assert_allclose(B.to_numpy(v), want, rtol=1e-12)
    # Mean shift: x0 = 0 is pulled to 1 but pushed harder from x1 = 3, three times as far.
    np.testing.assert_allclose(want[0][0], A[0][1] * A[0][2] * (1.0 - 3.0), rtol=1e-12)


def test_loss_value_is_mean_square_drift_and_stats():
    rng = np.random.default_rng(1)
    x, p = rng.normal(size=(16, 3)), rng.normal(size=(20, 3)) + 1.0
    loss, stats = driftloss.drifting_loss(B.asarray(x), B.asarray(p), return_stats=True)
    v, s, S, lam = reference_drift(x, p)
    np.testing.assert_allclose(float(B.to_numpy(loss)), np.mean(v**2), rtol=1e-12)
    np.testing.assert_allclose(float(B.to_numpy(stats["scale"])), S, rtol=1e-12)
    np.testing.assert_allclose(float(B.to_numpy(stats["feature_scale"])), s, rtol=1e-12)
    np.testing.assert_allclose(B.to_numpy(stats["drift_rms"]), lam, rtol=1e-12)
    nb = B.to_numpy(stats["neighbours"])
    assert nb.shape == (3,) and np.all(nb >= 1) and np.all(nb <= 16 + 20)


OPTION_CASES = {
    "default": {},
    "release-floor": {"affinity_floor": 1e-6},
    "kernel-y": {"kernel": "y"},
    "kernel-none": {"kernel": "none", "taus": (0.5, 1.0)},
    "raw": {"normalize": False, "taus": (0.3, 1.0)},
    "raw-floor": {"normalize": False, "affinity_floor": 1e-6, "taus": (0.3,)},
    "attraction-2x": {"attraction": 2.0},
    "repulsion-1.5x": {"repulsion": 1.5},
    "neg-only": {"x_as_negatives": False},
    "weights": {"weights": True},
}


def _case(seed, lead=(3,), n=9, p=11, m=5, d=4):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=lead + (n, d)), rng.normal(size=lead + (p, d)) * 1.3 + 0.7,
            rng.normal(size=lead + (m, d)) - 0.5, rng)


def _loss_and_grad(x, p, q, taus, dtype, **kw):
    args = [B.asarray(a, dtype) for a in (x, p, q)]
    kw = {k: (B.asarray(v, dtype) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    loss = driftloss.drifting_loss(*args, taus, **kw)
    grad = None
    if B.has_autodiff:
        grad = B.to_numpy(B.grad(lambda xx: driftloss.drifting_loss(xx, *args[1:], taus, **kw), args[0]))
    return float(B.to_numpy(loss)), grad


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_matches_float64_reference(name):
    opts = dict(OPTION_CASES[name])
    taus = opts.pop("taus", driftloss.DEFAULT_TAUS)
    x, p, q, rng = _case(hash(name) % 1000)
    if opts.pop("weights", False):
        opts.update(x_weight=rng.uniform(0.5, 1.5, size=(3, 9)), pos_weight=rng.uniform(size=(11,)),
                    neg_weight=rng.uniform(size=(3, 5)))
    want_loss, want_grad = reference_loss_and_grad(x, p, q, taus, **opts)
    loss, grad = _loss_and_grad(x, p, q, taus, F64, **opts)
    assert abs(loss - want_loss) <= 1e-10 * abs(want_loss)
    v, _, _, _ = reference_drift(x, p, q, taus, **opts)
    if B.has_autodiff:
        np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-10 * np.abs(want_grad).max())
    # float32: 1e-5 relative on the loss and on the gradient (in norm).
    loss32, grad32 = _loss_and_grad(x, p, q, taus, np.float32, **opts)
    assert abs(loss32 - want_loss) <= 1e-5 * abs(want_loss)
    if B.has_autodiff:
        assert np.linalg.norm(grad32 - want_grad) <= 1e-5 * np.linalg.norm(want_grad)


def test_drift_field_normalized_is_the_loss_drift():
    x, p, q, _ = _case(7)
    v = driftloss.drift_field(*(B.asarray(a) for a in (x, p, q)), driftloss.DEFAULT_TAUS, normalize=True)
    want, _, _, _ = reference_drift(x, p, q)
    np.testing.assert_allclose(B.to_numpy(v), want, rtol=1e-10, atol=1e-12)


def test_reduction_modes():
    x, p, q, _ = _case(3, lead=(2, 3))
    args = [B.asarray(a) for a in (x, p, q)]
    per = B.to_numpy(driftloss.drifting_loss(*args, reduction="none", problem_dims=2))
    v, _, _, _ = reference_drift(x, p, q)
    np.testing.assert_allclose(per, np.mean(v**2, axis=(-2, -1)), rtol=1e-10)
    assert per.shape == (2, 3)
    total = float(B.to_numpy(driftloss.drifting_loss(*args, reduction="sum", problem_dims=2)))
    np.testing.assert_allclose(total, per.sum(), rtol=1e-12)


def test_half_precision_inputs_compute_in_float32():
    if B.name == "strict":
        pytest.skip("array-api-strict has no float16 (docs/design.md §7)")
    x, p, _, _ = _case(5, lead=())
    xh = B.asarray(x, np.float16)
    loss = driftloss.drifting_loss(xh, B.asarray(p, np.float16))
    assert str(loss.dtype).endswith("float32")
    want, _ = reference_loss_and_grad(x.astype(np.float16), p.astype(np.float16))
    assert abs(float(B.to_numpy(loss)) - want) <= 1e-5 * want


def test_cfg_weight():
    assert driftloss.cfg_weight(1.0, 64, 32) == 0.0
    assert driftloss.cfg_weight(3.0, 65, 32) == pytest.approx(2 * 64 / 32)
    alpha = B.asarray([1.0, 2.0, 4.0], F64)
    np.testing.assert_allclose(B.to_numpy(driftloss.cfg_weight(alpha, 9, 4)), [0.0, 2.0, 6.0])
    with pytest.raises(ValueError, match="alpha must be >= 1"):
        driftloss.cfg_weight(0.5, 8, 4)
    with pytest.raises(ValueError, match="n_uncond must be a positive integer"):
        driftloss.cfg_weight(2.0, 8, 0)


def test_thousands_of_problems_and_a_single_one():
    rng = np.random.default_rng(11)
    x, p = rng.normal(size=(2000, 3, 2)), rng.normal(size=(2000, 2, 2))
    loss = float(B.to_numpy(driftloss.drifting_loss(B.asarray(x), B.asarray(p))))
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, reference_loss_and_grad(x, p)[0], rtol=1e-10)
    one = float(B.to_numpy(driftloss.drifting_loss(B.asarray(x[:1]), B.asarray(p[:1]))))
    np.testing.assert_allclose(one, reference_loss_and_grad(x[:1], p[:1])[0], rtol=1e-10)
