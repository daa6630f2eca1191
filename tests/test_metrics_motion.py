"""Motion metrics against values computed by hand."""

import numpy as np
import pytest
from scipy import linalg

from echo.metrics import motion


def test_mse_by_hand():
    a = np.array([[0.0, 1.0], [2.0, 3.0]])
    b = np.array([[1.0, 1.0], [2.0, 0.0]])
    assert motion.mse(a, b) == pytest.approx((1 + 0 + 0 + 9) / 4)


def test_frechet_distance_closed_form_on_given_statistics():
    # Commuting (diagonal) covariances: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    expected = 1.0 + 0.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert motion.frechet_distance_from_statistics(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-9)
    # A general (non-commuting) pair against the textbook formula
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    s1, s2 = a @ a.T + np.eye(3), b @ b.T + np.eye(3)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert motion.frechet_distance_from_statistics(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # Identical Gaussians are at distance 0
    assert motion.frechet_distance_from_statistics(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_from_samples_of_two_known_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = np.array([0.0, 0.0]), np.array([2.0, -1.0])
    s1, s2 = np.diag([1.0, 0.25]), np.diag([4.0, 1.0])
    x = rng.multivariate_normal(mu1, s1, size=20000)
    y = rng.multivariate_normal(mu2, s2, size=20000)
    closed_form = 5.0 + (1 - 2) ** 2 + (0.5 - 1) ** 2  # 6.25
    assert motion.frechet_distance(x, y) == pytest.approx(closed_form, rel=0.03)
    # pooling a list of clips equals one long sequence
    assert motion.frechet_distance([x[:7000], x[7000:]], y) == pytest.approx(motion.frechet_distance(x, y))
    # a shifted copy is farther than a resampled copy of the same Gaussian
    x2 = rng.multivariate_normal(mu1, s1, size=20000)
    assert motion.frechet_distance(x2, x) < 0.01 < motion.frechet_distance(x2 + 0.5, x)


def test_frechet_distance_singular_covariances_stay_finite():
    x = np.zeros((10, 4))
    x[:, 0] = np.arange(10)  # rank-1 covariance
    value = motion.frechet_distance(x, x + 1.0)
    assert np.isfinite(value) and value == pytest.approx(4.0, abs=1e-3)


def test_variance():
    assert motion.variance(np.full((12, 5), 3.7)) == 0.0
    seq = np.stack([np.array([0.0, 2.0, 0.0, 2.0]), np.array([1.0, 1.0, 1.0, 1.0])], axis=1)
    assert motion.variance(seq) == pytest.approx((1.0 + 0.0) / 2)


def _three_blobs(rng, n_per=40):
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    return np.concatenate([c + 0.1 * rng.normal(size=(n_per, 2)) for c in centres]), centres


def test_sid_spread_versus_stuck():
    rng = np.random.default_rng(2)
    gt, centres = _three_blobs(rng)
    spread = np.concatenate([c + 0.1 * rng.normal(size=(10, 2)) for c in centres])  # equally in all 3 clusters
    stuck = centres[1] + 0.1 * rng.normal(size=(30, 2))  # always one cluster
    assert motion.sid(spread, gt, num_clusters=3) == pytest.approx(np.log2(3))
    assert motion.sid(stuck, gt, num_clusters=3) == pytest.approx(0.0)
    # a 2:1 split: H = -(2/3 log2 2/3 + 1/3 log2 1/3)
    two = np.concatenate([np.repeat(centres[:1], 20, 0), np.repeat(centres[2:], 10, 0)])
    assert motion.sid(two, gt, num_clusters=3) == pytest.approx(-(2 / 3 * np.log2(2 / 3) + 1 / 3 * np.log2(1 / 3)))


def test_kmeans_is_seeded_and_finds_the_blobs():
    rng = np.random.default_rng(3)
    gt, centres = _three_blobs(rng)
    c1 = motion.kmeans(gt, 3, n_init=3, seed=0)
    c2 = motion.kmeans(gt, 3, n_init=3, seed=0)
    np.testing.assert_array_equal(c1, c2)
    found = c1[np.argsort(c1[:, 0] * 100 + c1[:, 1])]
    expected = centres[np.argsort(centres[:, 0] * 100 + centres[:, 1])]
    np.testing.assert_allclose(found, expected, atol=0.1)
    with pytest.raises(ValueError, match="num_clusters"):
        motion.kmeans(gt[:2], 3)


def test_rpcc_perfect_copy_and_symmetries():
    rng = np.random.default_rng(4)
    t = np.linspace(0, 4 * np.pi, 50)
    user = np.stack([np.sin(t), np.cos(t), t / 10], 1) + 0.1 * rng.normal(size=(50, 3))
    gt = 0.7 * user + 0.3 * rng.normal(size=(50, 3))
    gen = rng.normal(size=(50, 3))
    assert motion.rpcc(gt, gt, user) == 0.0
    # PCC is symmetric in avatar/user, so rPCC does not change when the roles are swapped inside each PCC term
    assert motion.pcc(gt, user) == pytest.approx(motion.pcc(user, gt))
    r = motion.rpcc(gen, gt, user)
    assert r == pytest.approx(abs(motion.pcc(user, gt) - motion.pcc(user, gen)))
    # |a - b| = |b - a|: swapping generated and ground truth keeps rPCC
    assert motion.rpcc(gt, gen, user) == pytest.approx(r)
    # invariant to an affine change of units of any sequence (PCC is)
    assert motion.rpcc(3.0 * gen + 2.0, gt, user) == pytest.approx(r)
    # a by-hand PCC: perfectly (anti-)correlated dims
    a = np.stack([np.arange(5.0), np.arange(5.0)], 1)
    b = np.stack([2 * np.arange(5.0) + 1, -np.arange(5.0)], 1)
    assert motion.pcc(a, b) == pytest.approx(0.0)  # (1 + -1) / 2
    assert motion.pcc(a, a) == pytest.approx(1.0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="`generated` has shape"):
        motion.mse(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        motion.variance(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="different dims"):
        motion.frechet_distance([np.zeros((3, 2)), np.zeros((3, 3))], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="centroids"):
        motion.sid(np.zeros((3, 2)))
