"""Feature groups of docs/design.md §4 against a float64 NumPy reference, on the backend under test."""

import numpy as np
import pytest
from backends import B

import driftloss

F64 = np.float64


def reference_groups(fmap, patch_sizes, prefix=""):
    """Float64 groups of an NCHW map with explicit loops over patches: name -> [n, L, C]."""
    f = np.asarray(fmap, F64).transpose(0, 2, 3, 1)  # [n, H, W, C]
    n, h, w, c = f.shape
    out = {
        f"{prefix}loc": f.reshape(n, h * w, c),
        f"{prefix}mean": f.mean(axis=(1, 2))[:, None, :],
        f"{prefix}std": f.std(axis=(1, 2))[:, None, :],
    }
    for p in patch_sizes:
        means, stds = [], []
        for i in range(h // p):
            for j in range(w // p):
                tile = f[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :]
                means.append(tile.mean(axis=(1, 2)))
                stds.append(tile.std(axis=(1, 2)))
        out[f"{prefix}mean_{p}"] = np.stack(means, axis=1)
        out[f"{prefix}std_{p}"] = np.stack(stds, axis=1)
    return out


def random_map(shape, seed=0, offset=0.0):
    return np.random.default_rng(seed).normal(size=shape) + offset


@pytest.mark.parametrize("shape", [(3, 5, 8, 8), (2, 3, 7, 10), (1, 2, 4, 4)])
def test_group_names_counts_and_values_float64(shape):
    fmap = random_map(shape, offset=2.0)
    got = driftloss.feature_groups(B.asarray(fmap, F64), prefix="stage2.block4.")
    ref = reference_groups(fmap, (2, 4), prefix="stage2.block4.")
    assert list(got) == [f"stage2.block4.{k}" for k in
                         ("loc", "mean", "std", "mean_2", "std_2", "mean_4", "std_4")]
    n, c, h, w = shape
    counts = {k.removeprefix("stage2.block4."): v.shape[1] for k, v in got.items()}
    l2, l4 = (h // 2) * (w // 2), (h // 4) * (w // 4)
    assert counts == {"loc": h * w, "mean": 1, "std": 1, "mean_2": l2, "std_2": l2, "mean_4": l4, "std_4": l4}
    for name, r in ref.items():
        g = B.to_numpy(got[name])
        assert g.shape == r.shape == (n, r.shape[1], c)
        assert g.dtype == F64
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12, err_msg=name)


def test_non_divisible_map_drops_the_remainder_rows_and_columns():
    fmap = random_map((2, 3, 7, 10), seed=1)
    got = driftloss.feature_groups(B.asarray(fmap, F64), patch_sizes=(3,))
    # 7 // 3 = 2 patch rows, 10 // 3 = 3 patch columns; row 6 and column 9 are left out.
    assert B.to_numpy(got["mean_3"]).shape == (2, 6, 3)
    last = fmap[:, :, 3:6, 6:9]  # patch (row 1, column 2), row-major index 5
    np.testing.assert_allclose(B.to_numpy(got["mean_3"])[:, 5], last.mean(axis=(2, 3)), rtol=1e-12)
    np.testing.assert_allclose(B.to_numpy(got["std_3"])[:, 5], last.std(axis=(2, 3)), rtol=1e-12)
    # The whole map, remainder included, still counts in loc, mean and std.
    np.testing.assert_allclose(B.to_numpy(got["mean"])[:, 0], fmap.mean(axis=(2, 3)), rtol=1e-12)


def test_float32_values_and_dtype():
    fmap = random_map((2, 4, 8, 8), seed=2, offset=1.0)
    got = driftloss.feature_groups(B.asarray(fmap, np.float32), patch_sizes=(2,))
    ref = reference_groups(fmap.astype(np.float32), (2,))
    for name, r in ref.items():
        g = B.to_numpy(got[name])
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6, err_msg=name)


def test_nhwc_layout_equals_nchw():
    fmap = random_map((2, 3, 8, 4), seed=3)
    nchw = driftloss.feature_groups(B.asarray(fmap, F64), patch_sizes=(2, 4))
    nhwc = driftloss.feature_groups(B.asarray(fmap.transpose(0, 2, 3, 1), F64), layout="NHWC",
                                    patch_sizes=(2, 4))
    assert list(nchw) == list(nhwc)
    for name in nchw:
        np.testing.assert_array_equal(B.to_numpy(nhwc[name]), B.to_numpy(nchw[name]))


def test_constant_map_has_zero_std():
    fmap = np.full((2, 3, 4, 4), 1.5)
    got = driftloss.feature_groups(B.asarray(fmap, np.float32))
    for name in ("std", "std_2", "std_4"):
        np.testing.assert_array_equal(B.to_numpy(got[name]), 0.0)
    np.testing.assert_array_equal(B.to_numpy(got["mean_2"]), 1.5)


def test_input_group_values():
    x = random_map((3, 4, 6, 5), seed=4)
    x[1, 2] = 0.0  # an all-zero channel
    got = B.to_numpy(driftloss.input_group(B.asarray(x, F64)))
    ref = np.sqrt((x ** 2).mean(axis=(2, 3)) + 1e-6)[:, None, :]
    assert got.shape == (3, 1, 4)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    np.testing.assert_allclose(got[1, 0, 2], 1e-3, rtol=1e-12)
    nhwc = driftloss.input_group(B.asarray(x.transpose(0, 2, 3, 1), F64), layout="NHWC")
    np.testing.assert_allclose(B.to_numpy(nhwc), ref, rtol=1e-12)


def test_global_group_flattens_each_sample():
    x = random_map((3, 4, 2, 5), seed=5)
    got = B.to_numpy(driftloss.global_group(B.asarray(x, F64)))
    np.testing.assert_array_equal(got, x.reshape(3, 1, 40))


def test_half_precision_maps_are_upcast_to_float32():
    if B.name == "strict":
        pytest.skip("array-api-strict has no float16")
    fmap = random_map((2, 3, 4, 4), seed=6)
    got = driftloss.feature_groups(B.asarray(fmap, np.float16))
    assert all(B.to_numpy(g).dtype == np.float32 for g in got.values())
    ref = reference_groups(fmap.astype(np.float16), (2, 4))
    np.testing.assert_allclose(B.to_numpy(got["std_2"]), ref["std_2"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "kwargs", "error", "match"),
    [
        ((2, 3, 3, 8), {"prefix": "stage3.block1."}, ValueError,
         r"map 'stage3.block1.' is 3x8 \(HxW\), smaller than the patch size 4"),
        ((2, 3, 8, 1), {"patch_sizes": (2,)}, ValueError,
         r"the map is 8x1 \(HxW\), smaller than the patch size 2"),
        ((2, 3, 8), {}, ValueError, r"must have shape \[n, C, H, W\] \(NCHW\)"),
        ((2, 3, 8, 8), {"layout": "CHWN"}, ValueError, "layout must be one of"),
        ((2, 3, 8, 8), {"patch_sizes": (2, 0)}, ValueError, "patch_sizes must be a sequence of positive"),
        ((2, 3, 8, 8), {"patch_sizes": 2}, ValueError, "patch_sizes must be a sequence of positive"),
        ((2, 3, 8, 8), {"patch_sizes": (2, 2)}, ValueError, "patch_sizes has duplicates"),
    ],
)
def test_bad_maps_and_options(shape, kwargs, error, match):
    with pytest.raises(error, match=match):
        driftloss.feature_groups(B.asarray(np.zeros(shape), np.float32), **kwargs)


def test_integer_map_is_rejected():
    with pytest.raises(TypeError, match="real floating dtype"):
        driftloss.feature_groups(B.asarray(np.zeros((1, 2, 4, 4)), np.int32))


def _std_sum(fmap):
    groups = driftloss.feature_groups(fmap, patch_sizes=(2, 4))
    return sum(B.xp.sum(groups[k]) for k in ("std", "std_2", "std_4"))


@pytest.mark.skipif(not B.has_autodiff, reason="needs autodiff (torch or jax)")
@pytest.mark.parametrize("dtype", [np.float32, F64])
def test_std_gradient_is_finite_and_zero_for_constant_maps(dtype):
    fmap = B.asarray(np.full((2, 3, 8, 8), 0.7), dtype)
    g = B.to_numpy(B.grad(_std_sum, fmap))
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g, 0.0)
    zeros = B.asarray(np.zeros((2, 3, 4, 4)), dtype)
    g_in = B.to_numpy(B.grad(lambda a: B.xp.sum(driftloss.input_group(a)), zeros))
    np.testing.assert_array_equal(g_in, 0.0)


@pytest.mark.skipif(not B.has_autodiff, reason="needs autodiff (torch or jax)")
def test_std_gradient_is_exact_where_the_variance_is_positive():
    # Only the top-left 4x4 patch varies; the rest of the 8x8 map is constant.
    f = np.zeros((1, 1, 8, 8))
    f[0, 0, :4, :4] = random_map((4, 4), seed=7)
    g = B.to_numpy(B.grad(lambda a: B.xp.sum(driftloss.feature_groups(a, patch_sizes=(4,))["std_4"]),
                          B.asarray(f, F64)))
    tile = f[0, 0, :4, :4]
    expected = np.zeros((8, 8))
    expected[:4, :4] = (tile - tile.mean()) / (tile.size * tile.std())  # d std / d x_i
    np.testing.assert_allclose(g[0, 0], expected, rtol=1e-10, atol=1e-14)
