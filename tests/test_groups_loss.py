"""drifting_loss_groups: the sum of one drifting_loss per group, locations as problems (docs/design.md §4)."""

import numpy as np
import pytest
from backends import HOOKS_AT, B, driftloss_hooks, swap_hooks

import driftloss

F64 = np.float64
G, N, P, M = 2, 5, 6, 4
SHAPES = {"s1.loc": (4, 3), "s2.mean_2": (2, 7)}  # group -> (L, C); few shapes keep JAX's compiles few


def random_groups(n, seed, offset=0.0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(G, n, L, C)) + offset for k, (L, C) in shapes.items()}


def on_backend(groups, dtype=F64):
    return {k: B.asarray(v, dtype) for k, v in groups.items()}


def single_loss(gen, pos, neg=None, **kw):
    """drifting_loss on [G, L, n, C] by hand for one group."""
    def t(a):
        return B.asarray(np.ascontiguousarray(a.transpose(0, 2, 1, 3)), F64)
    return driftloss.drifting_loss(t(gen), t(pos), None if neg is None else t(neg), problem_dims=2, **kw)


@pytest.fixture(scope="module")
def data():
    return random_groups(N, 0), random_groups(P, 1, offset=0.3), random_groups(M, 2, offset=-0.2)


def test_total_equals_sum_of_single_calls(data):
    gen, pos, _ = data
    total = driftloss.drifting_loss_groups(on_backend(gen), on_backend(pos))
    expected = sum(float(B.to_numpy(single_loss(gen[k], pos[k]))) for k in SHAPES)
    np.testing.assert_allclose(float(B.to_numpy(total)), expected, rtol=1e-12)
    assert B.to_numpy(total).shape == ()


def test_guidance_weights_per_class_broadcast_over_locations(data):
    gen, pos, neg = data
    alpha = np.array([1.0, 2.5])  # one guidance scale per class
    w = np.repeat(driftloss.cfg_weight(alpha, N, M)[:, None], M, axis=1)  # [G, M]
    total, stats = driftloss.drifting_loss_groups(
        on_backend(gen), on_backend(pos), on_backend(neg), (0.05, 0.2), neg_weight=B.asarray(w, F64),
        return_stats=True)
    per_location_w = B.asarray(w[:, None, :], F64)  # [G, 1, M] by hand
    singles = {k: single_loss(gen[k], pos[k], neg[k], taus=(0.05, 0.2), neg_weight=per_location_w,
                              return_stats=True) for k in SHAPES}
    expected = sum(float(B.to_numpy(loss)) for loss, _ in singles.values())
    np.testing.assert_allclose(float(B.to_numpy(total)), expected, rtol=1e-12)
    assert list(stats) == list(SHAPES)
    for k, (loss, single_stats) in singles.items():
        assert set(stats[k]) == {"scale", "feature_scale", "drift_rms", "neighbours", "energy_distance",
                                 "loss"}
        np.testing.assert_allclose(B.to_numpy(stats[k]["loss"]), B.to_numpy(loss), rtol=1e-12)
        for key, value in single_stats.items():
            np.testing.assert_allclose(B.to_numpy(stats[k][key]), B.to_numpy(value), rtol=1e-12, err_msg=key)
    # Class 0 has alpha = 1 (weight 0): its loss equals the loss without the extra negatives.
    per_class = driftloss.drifting_loss_groups(
        on_backend(gen), on_backend(pos), on_backend(neg), (0.05, 0.2), neg_weight=B.asarray(w, F64),
        reduction="none")
    unguided = driftloss.drifting_loss_groups(on_backend(gen), on_backend(pos), None, (0.05, 0.2),
                                              reduction="none")
    assert not np.allclose(B.to_numpy(per_class)[1], B.to_numpy(unguided)[1])


def test_reductions(data):
    gen, pos, _ = data
    g, p = on_backend(gen), on_backend(pos)
    per_class = B.to_numpy(driftloss.drifting_loss_groups(g, p, reduction="none"))
    mean = float(B.to_numpy(driftloss.drifting_loss_groups(g, p)))
    summed = float(B.to_numpy(driftloss.drifting_loss_groups(g, p, reduction="sum")))
    assert per_class.shape == (G,)
    np.testing.assert_allclose(per_class.mean(), mean, rtol=1e-12)
    expected_sum = sum(float(B.to_numpy(single_loss(gen[k], pos[k], reduction="sum"))) for k in SHAPES)
    np.testing.assert_allclose(summed, expected_sum, rtol=1e-12)
    by_hand = sum(B.to_numpy(single_loss(gen[k], pos[k], reduction="none")).mean(axis=-1) for k in SHAPES)
    np.testing.assert_allclose(per_class, by_hand, rtol=1e-12)


def test_locations_share_scale_but_have_their_own_kernels():
    # Two locations; at location 1 the points are location 0's shifted and scaled by 10. One shared S
    # makes location 1 dominate the scale: the group loss differs from two separate normalizations.
    rng = np.random.default_rng(3)
    g0, p0 = rng.normal(size=(1, N, 1, 2)), rng.normal(size=(1, P, 1, 2))
    gen = {"g": np.concatenate([g0, 10 * g0 + 5], axis=2)}
    pos = {"g": np.concatenate([p0, 10 * p0 + 5], axis=2)}
    group = float(B.to_numpy(driftloss.drifting_loss_groups(on_backend(gen), on_backend(pos))))
    separate = np.mean([float(B.to_numpy(single_loss(gen["g"][:, :, i:i + 1], pos["g"][:, :, i:i + 1])))
                        for i in range(2)])
    np.testing.assert_allclose(group, float(B.to_numpy(single_loss(gen["g"], pos["g"]))), rtol=1e-12)
    assert abs(group - separate) > 1e-3 * separate


def test_feature_groups_end_to_end():
    rng = np.random.default_rng(4)
    gen_map, pos_map = rng.normal(size=(G * N, 3, 4, 4)), rng.normal(size=(G * P, 3, 4, 4)) + 0.5

    def grouped(fmap, n):
        return {k: B.xp.reshape(v, (G, n, *v.shape[1:]))
                for k, v in driftloss.feature_groups(B.asarray(fmap, F64), prefix="m.").items()}

    total = driftloss.drifting_loss_groups(grouped(gen_map, N), grouped(pos_map, P))
    assert np.isfinite(float(B.to_numpy(total)))
    assert float(B.to_numpy(total)) > 0


@pytest.mark.skipif(not B.has_autodiff, reason="needs autodiff (torch or jax)")
def test_gradient_equals_sum_of_single_call_gradients(data):
    gen, pos, _ = data
    pos_b = on_backend(pos)
    arrays = {k: B.asarray(v, F64) for k, v in gen.items()}

    def total_of(first):
        return driftloss.drifting_loss_groups({**arrays, "s1.loc": first}, pos_b)

    got = B.to_numpy(B.grad(total_of, arrays["s1.loc"]))

    def single_of(first):
        x = B.xp.permute_dims(first, (0, 2, 1, 3))
        return driftloss.drifting_loss(x, B.asarray(pos["s1.loc"].transpose(0, 2, 1, 3), F64), problem_dims=2)

    expected = B.to_numpy(B.grad(single_of, arrays["s1.loc"]))
    assert np.abs(got).max() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.skipif(B.compile is None, reason="needs a compiler (torch.compile or jax.jit)")
@pytest.mark.parametrize("groups", ["different shapes", "one shape"])
def test_under_compile(data, shared_data, groups, sharing):
    # One temperature keeps the compile short.
    gen, pos, _ = data if groups == "different shapes" else shared_data
    g, p = on_backend(gen, np.float32), on_backend(pos, np.float32)

    def loss(a, b):
        return driftloss.drifting_loss_groups(a, b, taus=0.05, xp=B.xp)

    eager = loss(g, p)
    compiled = B.compile(loss)(g, p)
    np.testing.assert_allclose(B.to_numpy(compiled), B.to_numpy(eager), rtol=1e-5)


# Groups of one feature map share C (and n): they are evaluated together, each with its own S and lambda.
SHARED = {"m.loc": (4, 3), "m.mean": (1, 3), "m.mean_2": (2, 3), "n.loc": (2, 7)}


@pytest.fixture(scope="module")
def shared_data():
    return (random_groups(N, 5, shapes=SHARED), random_groups(P, 6, offset=0.3, shapes=SHARED),
            random_groups(M, 7, offset=-0.2, shapes=SHARED))


# Backend.stack_elements for "in runs": m.loc (4 locations: 264 points without neg, 360 with) alone,
# then m.mean and m.mean_2 (1 + 2 locations: 198 or 270 points) stacked together.
RUNS_LIMIT = 300


@pytest.fixture(params=["shared", "in runs", "one by one"])
def sharing(request):
    """Groups of one shape evaluated together (forced on every backend with a fast drift), stacked in
    runs of at most RUNS_LIMIT points, or one by one."""
    if HOOKS_AT is None:
        if request.param != "one by one":
            pytest.skip(f"{B.name} has no fast drift: each group runs the reference")
        yield request.param
        return
    with pytest.MonkeyPatch.context() as mp:
        swap_hooks(mp, share_groups=lambda a, on=request.param != "one by one": on,
                   stack_elements=RUNS_LIMIT if request.param == "in runs" else None)
        yield request.param


@pytest.mark.parametrize("kw", [dict(), dict(normalize=False, kernel="y"), dict(affinity_floor=1e-6)])
def test_groups_of_one_shape_equal_separate_calls(shared_data, kw, sharing):
    gen, pos, neg = shared_data
    w = np.repeat(driftloss.cfg_weight(np.array([1.5, 3.0]), N, M)[:, None], M, axis=1)  # [G, M]
    taus = (0.05, 0.2) if kw.get("normalize", True) else (0.5, 1.0)
    total, stats = driftloss.drifting_loss_groups(
        on_backend(gen), on_backend(pos), on_backend(neg), taus, neg_weight=B.asarray(w, F64),
        return_stats=True, **kw)
    per_class = driftloss.drifting_loss_groups(
        on_backend(gen), on_backend(pos), on_backend(neg), taus, neg_weight=B.asarray(w, F64),
        reduction="none", **kw)
    singles = {k: single_loss(gen[k], pos[k], neg[k], taus=taus, neg_weight=B.asarray(w[:, None, :], F64),
                              return_stats=True, reduction="none", **kw) for k in SHARED}
    by_hand = sum(B.to_numpy(loss).mean(axis=-1) for loss, _ in singles.values())
    np.testing.assert_allclose(B.to_numpy(per_class), by_hand, rtol=1e-12)
    np.testing.assert_allclose(float(B.to_numpy(total)), by_hand.mean(), rtol=1e-12)
    # Without stats, a shared evaluation gives its groups' whole term at once (_summed_loss).
    summed = sum(B.to_numpy(loss).sum() for loss, _ in singles.values())
    for reduction, expected in (("mean", by_hand.mean()), ("sum", summed)):
        got = driftloss.drifting_loss_groups(on_backend(gen), on_backend(pos), on_backend(neg), taus,
                                             neg_weight=B.asarray(w, F64), reduction=reduction, **kw)
        np.testing.assert_allclose(float(B.to_numpy(got)), expected, rtol=1e-12, err_msg=reduction)
    for k, (loss, single_stats) in singles.items():
        np.testing.assert_allclose(B.to_numpy(stats[k]["loss"]), B.to_numpy(loss).mean(), rtol=1e-12)
        for key, value in single_stats.items():
            np.testing.assert_allclose(B.to_numpy(stats[k][key]), B.to_numpy(value), rtol=1e-12,
                                       err_msg=f"{k} {key}")


@pytest.mark.skipif(not B.has_autodiff, reason="needs autodiff (torch or jax)")
def test_groups_of_one_shape_gradients(shared_data, sharing):
    gen, pos, _ = shared_data
    pos_b = on_backend(pos)
    arrays = on_backend(gen)

    for name in ("m.loc", "m.mean"):
        def total_of(a, name=name):
            return driftloss.drifting_loss_groups({**arrays, name: a}, pos_b)

        def single_of(a, name=name):
            p = B.asarray(pos[name].transpose(0, 2, 1, 3), F64)
            return driftloss.drifting_loss(B.xp.permute_dims(a, (0, 2, 1, 3)), p, problem_dims=2)

        got, expected = (B.to_numpy(B.grad(f, arrays[name])) for f in (total_of, single_of))
        assert np.abs(got).max() > 0
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)


def test_groups_of_one_shape_share_one_drift_evaluation(shared_data, sharing):
    if HOOKS_AT is None:
        pytest.skip(f"{B.name} has no fast drift: each group runs the reference")
    gen, pos, _ = shared_data
    hook, seen = driftloss_hooks().compute_drift, []

    def spy(*args, segments=None, **kwargs):
        seen.append(None if segments is None else list(segments))
        return hook(*args, segments=segments, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        swap_hooks(mp, compute_drift=spy)
        driftloss.drifting_loss_groups(on_backend(gen), on_backend(pos))
    if sharing == "shared":  # m.* stacked along their locations (4 + 1 + 2 per class, 2 classes); n.loc alone
        assert sorted(seen, key=lambda s: s is None) == [[0, 0, 0, 0, 1, 2, 2] * G, None]
    elif sharing == "in runs":  # m.loc alone, m.mean and m.mean_2 stacked (1 + 2 per class); n.loc alone
        assert sorted(seen, key=lambda s: s is None) == [[0, 1, 1] * G, None, None]
    else:
        assert seen == [None] * len(SHARED)


def test_groups_are_shared_where_operations_have_a_fixed_cost():
    """JAX and torch accelerators stack the groups of one shape; eager CPU libraries do not."""
    if HOOKS_AT is None:
        pytest.skip(f"{B.name} has no fast drift: each group runs the reference")
    x = B.asarray(np.zeros((2, 3)), F64)
    assert driftloss_hooks().share_groups(x) == (B.name == "jax")


def _bad(data, **changes):
    gen, pos, neg = (on_backend(d) for d in data)
    return {"gen": gen, "pos": pos, "neg": neg, **changes}


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda d: _bad(d, gen={}), ValueError, "gen is empty"),
        (lambda d: _bad(d, pos={}), ValueError, "pos is empty"),
        (lambda d: _bad(d, pos=None), TypeError, "pos must be a mapping"),
        (lambda d: _bad(d, pos={k: v for k, v in _bad(d)["pos"].items() if k != "s2.mean_2"}), ValueError,
         r"pos must have the same groups as gen; missing in pos: \['s2.mean_2'\], not in gen: \[\]"),
        (lambda d: _bad(d, neg={**_bad(d)["neg"], "extra": B.asarray(np.zeros((G, M, 1, 3)))}), ValueError,
         r"neg must have the same groups as gen; missing in neg: \[\], not in gen: \['extra'\]"),
        (lambda d: _bad(d, pos={**_bad(d)["pos"], "s2.mean_2": B.asarray(np.zeros((G, P, 3, 7)))}),
         ValueError,
         r"group 's2.mean_2': pos has shape \(2, 6, 3, 7\) but gen has \(2, 5, 2, 7\)"),
        (lambda d: _bad(d, neg={**_bad(d)["neg"], "s1.loc": B.asarray(np.zeros((G, M, 4, 2)))}), ValueError,
         r"group 's1.loc': neg has shape \(2, 4, 4, 2\) but gen has \(2, 5, 4, 3\)"),
        (lambda d: _bad(d, pos={**_bad(d)["pos"], "s2.mean_2": B.asarray(np.zeros((1, P, 2, 7)))}),
         ValueError,
         r"group 's2.mean_2': pos has shape \(1, 6, 2, 7\) but gen has \(2, 5, 2, 7\)"),
        (lambda d: _bad(d, gen={**_bad(d)["gen"], "s2.mean_2": B.asarray(np.zeros((N, 7)))},
                        pos={**_bad(d)["pos"], "s2.mean_2": B.asarray(np.zeros((P, 7)))}), ValueError,
         r"group 's2.mean_2': gen must have shape \[\.\.\., n, L, C\]; got \(5, 7\)"),
    ],
)
def test_bad_groups(data, make, error, match):
    kw = make(data)
    with pytest.raises(error, match=match):
        driftloss.drifting_loss_groups(kw["gen"], kw["pos"], kw["neg"])


def test_taus_given_in_the_place_of_neg(data):
    gen, pos, _ = (on_backend(d) for d in data)
    with pytest.raises(TypeError, match=r"neg must be a mapping .* got float \(taus is the fourth argument"):
        driftloss.drifting_loss_groups(gen, pos, 0.05)


def test_core_errors_name_the_group(data):
    gen, pos, neg = (on_backend(d) for d in data)
    with pytest.raises(ValueError, match=r"drifting_loss_groups: group 's1.loc': drifting_loss: neg_weight"):
        driftloss.drifting_loss_groups(gen, pos, neg, neg_weight=B.asarray(np.ones((G, M + 1)), F64))
    with pytest.raises(ValueError, match="reduction must be one of"):
        driftloss.drifting_loss_groups(gen, pos, reduction="max")
