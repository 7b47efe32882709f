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
