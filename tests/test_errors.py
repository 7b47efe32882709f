"""Bad input gets a clear error naming the argument and the shapes."""

import numpy as np
import pytest
from backends import B

import driftloss

rng = np.random.default_rng(0)


def arr(*shape, dtype=np.float64):
    return B.asarray(rng.normal(size=shape), dtype)


def test_mismatched_feature_dim():
    with pytest.raises(ValueError, match=r"pos has D=4 features but x has D=3 .*x.shape=\(8, 3\)"):
        driftloss.drifting_loss(arr(8, 3), arr(5, 4))
    with pytest.raises(ValueError, match=r"neg has D=2 features but x has D=3"):
        driftloss.drifting_loss(arr(8, 3), arr(5, 3), arr(4, 2))


def test_mismatched_leading_dims():
    with pytest.raises(ValueError, match=r"pos has leading dims \(3,\) but x has \(2,\)"):
        driftloss.drifting_loss(arr(2, 8, 3), arr(3, 5, 3))


def test_too_few_generated_samples_to_be_their_own_negatives():
    with pytest.raises(ValueError, match=r"x has N=1 sample\(s\) and no extra negatives.*N >= 2"):
        driftloss.drifting_loss(arr(1, 3), arr(5, 3))
    # With extra negatives a single generated sample is fine.
    assert np.isfinite(float(B.to_numpy(driftloss.drifting_loss(arr(1, 3), arr(5, 3), arr(2, 3)))))


def test_empty_pos_and_x():
    with pytest.raises(ValueError, match=r"pos is empty \(pos.shape=\(0, 3\)\)"):
        driftloss.drifting_loss(arr(4, 3), arr(0, 3))
    with pytest.raises(ValueError, match=r"x is empty"):
        driftloss.drifting_loss(arr(0, 3), arr(4, 3), arr(2, 3))


def test_too_few_dims():
    with pytest.raises(ValueError, match=r"x must have shape \[..., n, D\]; got shape \(8,\)"):
        driftloss.drifting_loss(arr(8), arr(5, 3))


def test_neg_required_without_x_as_negatives():
    with pytest.raises(ValueError, match="x_as_negatives=False needs a non-empty neg"):
        driftloss.drift_field(arr(4, 3), arr(5, 3), x_as_negatives=False)


def test_weight_shapes():
    with pytest.raises(ValueError, match=r"pos_weight must have shape \(5,\).*got \(4,\)"):
        driftloss.drifting_loss(arr(8, 3), arr(5, 3), pos_weight=arr(4))
    with pytest.raises(ValueError, match=r"neg_weight must have shape \(2, 4\).*got \(3, 4\)"):
        driftloss.drifting_loss(arr(2, 8, 3), arr(2, 5, 3), arr(2, 4, 3), neg_weight=arr(3, 4))
    with pytest.raises(ValueError, match=r"neg_weight is given but neg is None"):
        driftloss.drifting_loss(arr(8, 3), arr(5, 3), neg_weight=arr(4))


def test_negative_weights():
    w = B.asarray(np.array([1.0, -0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"neg_weight must be non-negative; got a minimum of -0.5"):
        driftloss.drifting_loss(arr(8, 3), arr(5, 3), arr(4, 3), neg_weight=w)


@pytest.mark.parametrize("taus", [0.0, -0.1, (0.05, 0.0), (), float("inf")])
def test_bad_temperatures(taus):
    with pytest.raises(ValueError, match="temperature|taus is empty"):
        driftloss.drifting_loss(arr(8, 3), arr(5, 3), taus=taus)


def test_non_numeric_temperature():
    with pytest.raises(TypeError, match="taus must be"):
        driftloss.drifting_loss(arr(8, 3), arr(5, 3), taus="0.05")


def test_integer_and_complex_dtypes():
    xi = B.asarray(np.arange(24).reshape(8, 3), np.int64)
    with pytest.raises(TypeError, match=r"x must have a real floating dtype .*got .*int64"):
        driftloss.drifting_loss(xi, arr(5, 3))
    if B.name != "strict":  # array-api-strict complex arrays are fine too, but keep it simple
        xc = B.asarray(np.ones((8, 3)) + 1j, np.complex128)
        with pytest.raises(TypeError, match=r"x must have a real floating dtype .*complex128"):
            driftloss.drifting_loss(xc, arr(5, 3))


def test_options():
    with pytest.raises(ValueError, match=r"kernel must be one of \('both', 'y', 'none'\); got 'x'"):
        driftloss.drifting_loss(arr(8, 3), arr(5, 3), kernel="x")
    with pytest.raises(ValueError, match="reduction must be one of"):
        driftloss.drifting_loss(arr(8, 3), arr(5, 3), reduction="max")
    with pytest.raises(ValueError, match="affinity_floor must be in"):
        driftloss.drifting_loss(arr(8, 3), arr(5, 3), affinity_floor=-1e-6)
    with pytest.raises(ValueError, match="attraction must be a finite non-negative number"):
        driftloss.drifting_loss(arr(8, 3), arr(5, 3), attraction=-1.0)


def test_arrays_from_two_libraries():
    other = np.asarray if B.name != "numpy" else None
    if other is None:
        import array_api_strict as xs

        other = xs.asarray
    with pytest.raises(TypeError, match=r"all arrays must come from one array library; got x: .*, pos: "):
        driftloss.drifting_loss(arr(8, 3), other(rng.normal(size=(5, 3))))


def test_arrays_on_two_devices():
    if B.name == "strict":
        import array_api_strict as xs

        other = xs.asarray(rng.normal(size=(5, 3)), device=xs.Device("device1"))
    elif B.name == "torch":
        import torch

        other = torch.zeros(5, 3, dtype=torch.float64, device="meta")
    elif B.name == "jax":
        import jax

        other = jax.device_put(rng.normal(size=(5, 3)), jax.devices()[1])
    else:
        pytest.skip(f"{B.name} offers a single CPU device here: no second device to mix")
    with pytest.raises(ValueError, match=r"all arrays must be on one device; x is on .* but pos is on"):
        driftloss.drifting_loss(arr(8, 3), other)


# ---- issue 20: unflattened images, broadcasting, non-finite values, silent zeros, lists, masks ----------

def value(a):
    return float(B.to_numpy(a))


def run(f, *args, **kw):
    """f(*args, **kw) as NumPy; jitted on JAX (eager JAX compiles each operation anew), so that
    values are compared here and the eager checks in the error tests."""
    return B.to_numpy(B.run(f, *args, **kw))


def test_image_batch_is_refused_with_a_hint_to_flatten():
    """A batch of images [N, C, H, W] must not be read as N*C problems of H rows in W dims."""
    x, pos = arr(16, 1, 8, 8), arr(12, 1, 8, 8)
    flatten = (r"x has 4 dims \[16, 1, 8, 8\]: samples are \[N, D\] vectors.*flatten.*x.flatten\(1\)"
               r".*problem_dims=2")
    with pytest.raises(ValueError, match=flatten):
        driftloss.drifting_loss(x, pos)
    with pytest.raises(ValueError, match=flatten):
        driftloss.drifting_loss(x, arr(16, 1, 8, 8))  # same batch size: still refused
    with pytest.raises(ValueError, match=flatten):
        driftloss.drift_field(x, pos)
    with pytest.raises(ValueError, match=r"pos has 4 dims \[12, 1, 8, 8\].*flatten"):
        driftloss.drifting_loss(arr(16, 64), pos)  # x flattened, pos not
    with pytest.raises(ValueError, match=r"neg has 5 dims"):
        driftloss.drifting_loss(arr(16, 64), arr(12, 64), arr(1, 2, 3, 4, 64))
    # Flattened, the same data is one problem of 64-dim samples.
    flat = driftloss.drifting_loss(B.xp.reshape(x, (16, 64)), B.xp.reshape(pos, (12, 64)))
    assert np.isfinite(value(flat))


def test_problem_dims_opts_in_to_leading_problem_dims():
    x, pos = arr(16, 2, 8, 8), arr(16, 2, 5, 8)
    loss = run(driftloss.drifting_loss, x, pos, problem_dims=2)
    # The same problems as one leading dim: the same loss.
    flat = run(driftloss.drifting_loss, B.xp.reshape(x, (32, 8, 8)), B.xp.reshape(pos, (32, 5, 8)))
    np.testing.assert_allclose(loss, flat, rtol=1e-12)
    assert run(driftloss.drift_field, x, pos, problem_dims=2).shape == (16, 2, 8, 8)
    # problem_dims must describe x exactly.
    with pytest.raises(ValueError, match=r"problem_dims=1 says x is \[1 problem dim\(s\), N, D\] \(3 dims\); "
                                         r"got x.shape=\(16, 2, 8, 8\) \(4 dims\)"):
        driftloss.drifting_loss(x, pos, problem_dims=1)
    with pytest.raises(TypeError, match=r"problem_dims must be a non-negative int"):
        driftloss.drifting_loss(x, pos, problem_dims=True)
    # Explicit problem_dims=0 on plain [N, D] input, as without it.
    x, pos = arr(8, 3), arr(5, 3)
    np.testing.assert_allclose(run(driftloss.drifting_loss, x, pos, problem_dims=0),
                               run(driftloss.drifting_loss, x, pos), rtol=1e-12)


def test_unequal_leading_dims_name_the_likely_cause():
    with pytest.raises(ValueError, match=r"pos has leading dims \(32,\) but x has \(16,\).*broadcast.*"
                                         r"flatten each to a D-vector"):
        driftloss.drifting_loss(arr(16, 28, 28), arr(32, 28, 28))  # grayscale images [N, H, W]
    with pytest.raises(ValueError, match=r"pos has leading dims \(32, 1\) but x has \(16, 1\)"):
        driftloss.drifting_loss(arr(16, 1, 8, 8), arr(32, 1, 8, 8), problem_dims=2)
    with pytest.raises(ValueError, match=r"pos has leading dims \(3,\) but x has \(\)"):
        driftloss.drifting_loss(arr(8, 3), arr(3, 5, 3))  # x does not broadcast to pos


@pytest.mark.parametrize("lead, pos_lead, problem_dims", [
    ((3,), (), None), ((2, 3), (3,), 2), ((2, 3), (2, 1), 2)])
def test_pos_and_neg_broadcast_over_problems(lead, pos_lead, problem_dims):
    """pos [P, D] (or leading dims that broadcast) is shared by every problem of x: the same value and
    gradient as the explicitly expanded call."""
    X = rng.normal(size=(*lead, 7, 3))
    P, Q = rng.normal(size=(*pos_lead, 5, 3)) + 0.3, rng.normal(size=(*pos_lead, 4, 3)) - 0.2
    expanded = [B.asarray(np.ascontiguousarray(np.broadcast_to(a, (*lead, *a.shape[-2:])))) for a in (P, Q)]
    kw = dict(problem_dims=problem_dims, neg_weight=B.asarray(np.full(4, 0.5)))
    x, p, q = B.asarray(X), B.asarray(P), B.asarray(Q)
    np.testing.assert_allclose(run(driftloss.drifting_loss, x, p, q, **kw),
                               run(driftloss.drifting_loss, x, *expanded, **kw), rtol=1e-12)
    np.testing.assert_allclose(run(driftloss.drift_field, x, p, q, problem_dims=problem_dims),
                               run(driftloss.drift_field, x, *expanded, problem_dims=problem_dims),
                               rtol=1e-12, atol=1e-14)
    if B.has_autodiff:
        g, g_want = (B.to_numpy(B.grad_of(driftloss.drifting_loss, x, *pq, **kw))
                     for pq in ((p, q), expanded))
        np.testing.assert_allclose(g, g_want, rtol=1e-12, atol=1e-16)
    if not pos_lead:  # eager, with the value checks
        np.testing.assert_allclose(value(driftloss.drifting_loss(x, p, q, **kw)),
                                   value(driftloss.drifting_loss(x, *expanded, **kw)), rtol=1e-12)


@pytest.mark.parametrize("name", ["x", "pos", "neg"])
def test_non_finite_points_are_named_and_counted(name):
    arrays = {"x": rng.normal(size=(8, 3)), "pos": rng.normal(size=(5, 3)), "neg": rng.normal(size=(4, 3))}
    arrays[name][1, 0], arrays[name][2, 2], arrays[name][3, 1] = np.nan, np.inf, -np.inf
    args = [B.asarray(arrays[k]) for k in ("x", "pos", "neg")]
    match = rf"drifting_loss: {name} holds 3 non-finite value\(s\) \(1 NaN, 2 inf\) among its"
    with pytest.raises(ValueError, match=match):
        driftloss.drifting_loss(*args)
    with pytest.raises(ValueError, match=match.replace("drifting_loss", "drift_field")):
        driftloss.drift_field(*args)


@pytest.mark.skipif(B.name != "jax", reason="jit is JAX's; torch.compile is checked in test_properties")
def test_non_finite_points_under_jit_give_nan():
    """Under jit the values are not concrete: no check, and the documented NaN result."""
    import jax

    x = rng.normal(size=(8, 3))
    x[0, 0] = np.nan
    loss = jax.jit(lambda x, p: driftloss.drifting_loss(x, p))(B.asarray(x), arr(5, 3))
    assert np.isnan(value(loss))


def test_bad_weight_values():
    nan_weight = B.asarray(np.array([1.0, np.nan, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"pos_weight must be finite and non-negative; it holds 1 NaN"):
        driftloss.drifting_loss(arr(8, 3), arr(5, 3), pos_weight=nan_weight)
    zero = r"pos_weight is zero for every pos column in every problem: .*identically zero"
    with pytest.raises(ValueError, match=zero):
        driftloss.drifting_loss(arr(8, 3), arr(5, 3), pos_weight=B.asarray(np.zeros(5)))
    with pytest.raises(ValueError, match=zero.replace("drifting_loss", "drift_field")):
        driftloss.drift_field(arr(8, 3), arr(5, 3), pos_weight=B.asarray(np.zeros(5)))
    w = np.ones((3, 5))
    w[1] = 0.0
    with pytest.raises(ValueError, match=r"pos_weight is zero for every pos column in 1 of 3 problem\(s\)"):
        driftloss.drifting_loss(arr(3, 8, 3), arr(3, 5, 3), pos_weight=B.asarray(w))
    # Zero weights on some positives, or on all extra negatives (guidance at alpha = 1), are fine.
    w[1, 0] = 1.0
    driftloss.drifting_loss(arr(3, 8, 3), arr(3, 5, 3), arr(3, 4, 3), pos_weight=B.asarray(w),
                            neg_weight=B.asarray(np.zeros(4)))


def test_cfg_weight_needs_two_generated_samples():
    with pytest.raises(ValueError, match=r"guidance needs n_gen >= 2 .*n_gen=1.*excluding itself"):
        driftloss.cfg_weight(2.0, 1, 8)
    with pytest.raises(ValueError, match=r"guidance needs n_gen >= 2"):
        driftloss.cfg_weight(B.asarray(np.array([1.0, 2.0])), 1, 8)
    assert driftloss.cfg_weight(2.0, 2, 8) == pytest.approx(1 / 8)


def test_python_lists_and_numbers():
    X, P, Q = rng.normal(size=(8, 3)), rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    want = value(driftloss.drifting_loss(B.asarray(X), B.asarray(P), B.asarray(Q)))
    # Lists with arrays of the backend: converted to that library, in x's dtype and on its device.
    got = driftloss.drifting_loss(B.asarray(X), P.tolist(), [tuple(r) for r in Q])
    assert type(got) is type(driftloss.drifting_loss(B.asarray(X), B.asarray(P)))
    np.testing.assert_allclose(value(got), want, rtol=1e-12)
    # Lists only: NumPy, and integers as floats.
    np.testing.assert_allclose(float(driftloss.drifting_loss(X.tolist(), P.tolist(), Q.tolist())), want,
                               rtol=1e-12)
    ints = driftloss.drifting_loss([[0, 1], [1, 0], [2, 2]], [[1, 1], [0, 0]])
    np.testing.assert_allclose(float(ints), float(driftloss.drifting_loss(
        np.array([[0.0, 1], [1, 0], [2, 2]]), np.array([[1.0, 1], [0, 0]]))), rtol=1e-12)
    # Weights as lists, bools as masks.
    np.testing.assert_allclose(
        value(driftloss.drifting_loss(B.asarray(X), B.asarray(P), pos_weight=[1, 0, 1, 1, 0])),
        value(driftloss.drifting_loss(B.asarray(X), B.asarray(P),
                                      pos_weight=[True, False, True, True, False])),
        rtol=1e-12)
    with pytest.raises(ValueError, match=r"x must have shape \[..., n, D\]; got shape \(\)"):
        driftloss.drifting_loss(1.0, B.asarray(P))


@pytest.mark.skipif(B.name not in ("torch", "jax"), reason="the framework adapters")
def test_adapters_take_lists_and_numpy():
    X, P, W = rng.normal(size=(8, 3)), rng.normal(size=(5, 3)), np.array([1.0, 0.0, 2.0, 1.0, 1.0])
    module = driftloss.adapters.torch if B.name == "torch" else driftloss.adapters.jax
    want = module.drifting_loss(B.asarray(X), B.asarray(P), pos_weight=B.asarray(W))
    for x, p, w in ((X.tolist(), P.tolist(), W.tolist()), (X, P, W), (B.asarray(X), P.tolist(), W)):
        got = module.drifting_loss(x, p, pos_weight=w)
        assert type(got) is type(want)
        np.testing.assert_allclose(value(got), value(want), rtol=1e-6)
    v = module.drift_field(X.tolist(), P.tolist())
    assert type(v) is type(want)
    if B.name == "torch":
        crit = module.DriftingLoss()
        np.testing.assert_allclose(value(crit(X.tolist(), P, pos_weight=W)), value(want), rtol=1e-6)


@pytest.mark.parametrize("name", ["x_weight", "pos_weight", "neg_weight"])
def test_boolean_weights_are_zero_one_masks(name):
    X, P, Q = rng.normal(size=(2, 8, 3)), rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 4, 3))
    n = {"x_weight": 8, "pos_weight": 5, "neg_weight": 4}[name]
    mask = rng.uniform(size=(2, n)) < 0.6
    mask[:, 0] = True
    args = [B.asarray(a) for a in (X, P, Q)]
    masks = (B.asarray(mask), B.asarray(mask.astype(np.float64)))
    got, want = (run(driftloss.drifting_loss, *args, **{name: w}) for w in masks)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    if name == "pos_weight":  # eager, with the value checks
        eager = value(driftloss.drifting_loss(*args, **{name: masks[0]}))
        np.testing.assert_allclose(eager, want, rtol=1e-12)
    if B.has_autodiff:
        g, g_want = (B.to_numpy(B.grad_of(driftloss.drifting_loss, *args, **{name: w})) for w in masks)
        np.testing.assert_allclose(g, g_want, rtol=1e-12, atol=1e-16)
    with pytest.raises(TypeError, match=rf"{name} must have a real floating dtype \(or be a bool mask\)"):
        driftloss.drifting_loss(*args, **{name: B.asarray(mask.astype(np.int64))})


def test_groups_value_checks_name_the_group():
    gen = {"a": arr(2, 6, 3, 4), "b": arr(2, 6, 5, 4)}
    pos = {"a": arr(2, 5, 3, 4), "b": arr(2, 5, 5, 4)}
    bad = rng.normal(size=(2, 5, 5, 4))
    bad[0, 1, 2, 3] = np.inf
    with pytest.raises(ValueError, match=r"drifting_loss_groups: group 'b': drifting_loss: pos holds 1 "
                                         r"non-finite value\(s\) \(0 NaN, 1 inf\)"):
        driftloss.drifting_loss_groups(gen, {**pos, "b": B.asarray(bad)})
    with pytest.raises(ValueError, match=r"group 'a': drifting_loss: pos_weight is zero for every pos"):
        driftloss.drifting_loss_groups(gen, pos, pos_weight=B.asarray(np.zeros(5)))
    mask = np.array([True, False, True, True, True])
    np.testing.assert_allclose(
        run(driftloss.drifting_loss_groups, gen, pos, pos_weight=B.asarray(mask)),
        run(driftloss.drifting_loss_groups, gen, pos, pos_weight=B.asarray(mask.astype(np.float64))),
        rtol=1e-12)


@pytest.mark.skipif(B.name != "torch", reason="a torch 'meta' tensor stands in for an accelerator's array")
def test_finiteness_alone_never_waits_for_an_accelerator():
    """On a device, NaN/inf flags are read only along with the weights' flags: reading a meta tensor's
    value raises, so a read without weights would fail this test; with a weight check it must be read."""
    import array_api_compat.torch as xp
    import torch

    from driftloss._validation import ValueChecks

    meta = torch.zeros(4, 3, device="meta")
    checks = ValueChecks(xp, lambda a: True)
    checks.finite("f", "x", meta)
    checks.raise_if_failed()                        # no read: nothing raised
    checks.non_negative("f", "pos_weight", torch.ones(4, device="meta"))
    with pytest.raises((NotImplementedError, RuntimeError)):
        checks.raise_if_failed()                    # now the flags are read (and meta has no values)
    host = ValueChecks(xp, lambda a: True)
    host.finite("f", "x", torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="x holds 1 non-finite"):
        host.raise_if_failed()                      # host arrays are always checked
