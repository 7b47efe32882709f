"""Sample metrics and toy targets on fixtures with hand-computed values."""

import numpy as np
import pytest

from reference_trainers.common.sample_metrics import energy_distance, mmd, modes_covered, sample_metrics
from reference_trainers.toy.data import TARGETS, initial_output, make_target, step_batch


def test_energy_distance_of_identical_samples_is_zero():
    x = np.random.default_rng(0).standard_normal((50, 2))
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)


def test_energy_distance_of_point_masses_is_twice_their_distance():
    x = np.zeros((7, 2))
    y = np.tile([3.0, 4.0], (5, 1))                     # distance 5
    assert energy_distance(x, y) == pytest.approx(10.0)


def test_energy_distance_hand_case():
    # x = {0, 1}, y = {0}: 2 E|X-Y| = 1, E|X-X'| = (0 + 1 + 1 + 0) / 4 = 0.5, E|Y-Y'| = 0
    assert energy_distance(np.array([[0.0], [1.0]]), np.array([[0.0]])) == pytest.approx(0.5)


def test_mmd_of_identical_samples_is_zero_and_point_masses_by_hand():
    x = np.random.default_rng(1).standard_normal((40, 2))
    assert mmd(x, x) == pytest.approx(0.0, abs=1e-7)
    a, sigma = 0.5, 0.25
    expected = np.sqrt(2 - 2 * np.exp(-(a**2) / (2 * sigma**2)))
    assert mmd(np.zeros((3, 2)), np.tile([0.0, a], (4, 1)), bandwidth=sigma) == pytest.approx(expected)


def test_mmd_hand_case():
    # x = {0, 1}, y = {0}, sigma = 1: MMD^2 = (1 + 1 + 2e)/4 + 1 - 2 (1 + e)/2 = (1 - e)/2, e = exp(-1/2)
    e = np.exp(-0.5)
    got = mmd(np.array([[0.0], [1.0]]), np.array([[0.0]]), bandwidth=1.0)
    assert got == pytest.approx(np.sqrt((1 - e) / 2))


def test_modes_covered_counts_modes_with_a_fair_share():
    # 100 samples, 4 modes: fair share 25, threshold 0.25 * 25 = 6.25 samples
    assignments = np.array([0] * 40 + [1] * 40 + [2] * 7 + [3] * 6 + [-1] * 7)
    assert modes_covered(assignments, 4) == 3
    assert modes_covered(assignments, 4, min_fraction=0.3) == 2
    assert modes_covered(np.full(10, -1), 8) == 0
    assert modes_covered(assignments, None) is None


def test_assign_modes_on_constructed_points():
    t = make_target("8gaussians")
    pts = np.concatenate([t.centers + 0.2, [[0.0, 0.0], [10.0, 10.0]]])   # 0.28 from each centre: inside
    np.testing.assert_array_equal(t.assign_modes(pts), list(range(8)) + [-1, -1])
    board = make_target("checkerboard")
    np.testing.assert_array_equal(board.assign_modes(np.array([[-1.5, -1.5], [-0.5, -1.5], [1.5, 1.5]])),
                                  [0, -1, 7])
    assert make_target("swissroll").modes_total is None


@pytest.mark.parametrize("name", TARGETS)
def test_targets_sample_inside_their_modes_and_metrics_of_a_perfect_generator(name):
    t = make_target(name)
    rng = np.random.default_rng(2)
    a, b, c = (t.sample(rng, 1000) for _ in range(3))
    assert a.shape == (1000, 2) and a.dtype == np.float32
    m = sample_metrics(a, b, c, t)
    assert m["modes_covered"] == t.modes_total
    assert m["energy_distance"] < 0.01 and m["energy_distance_reference"] < 0.01
    if t.modes_total is not None:
        assert m["fraction_in_modes"] > 0.98


def test_step_batch_is_a_function_of_seed_and_step():
    t = make_target("bimodal")
    n1, r1 = step_batch(t, 3, 17, 8, 5, 32)
    n2, r2 = step_batch(t, 3, 17, 8, 5, 32)
    n3, _ = step_batch(t, 3, 18, 8, 5, 32)
    assert n1.shape == (8, 32) and r1.shape == (5, 2)
    np.testing.assert_array_equal(n1, n2)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(n1, n3)


def test_collapsed_init_sits_on_the_first_mode():
    t = make_target("8gaussians")
    centre, spread = initial_output(t, "collapsed")
    np.testing.assert_allclose(centre, [2.0, 0.0])
    assert spread == t.std
