"""Frechet distance against closed forms and against the scipy.sqrtm route."""

import numpy as np
import pytest
import scipy.linalg

from sbmae.eval import frechet


def _random_spd(rng, dim, rank=None):
  a = rng.normal(size=(dim, rank or dim))
  return a @ a.T / dim + (0.0 if rank else 0.1 * np.eye(dim))


def _random_rotation(rng, dim):
  q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
  return q * np.sign(np.diag(r))


def _sqrtm_reference(mu1, s1, mu2, s2):
  """pytorch-fid's formula (scipy sqrtm of the product), for well-conditioned cases."""
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_identical_gaussians_give_zero():
  rng = np.random.default_rng(0)
  mu = rng.normal(size=6)
  for sigma in (_random_spd(rng, 6), _random_spd(rng, 6, rank=2)):  # full rank and singular
    assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_one_dimensional_closed_form():
  # FD(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2.
  got = frechet.frechet_distance([1.5], [[4.0]], [-0.5], [[0.25]])
  np.testing.assert_allclose(got, 2.0**2 + (2.0 - 0.5) ** 2, rtol=1e-12)


def test_diagonal_closed_form_including_zero_variances():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  std1, std2 = rng.uniform(0.1, 2.0, size=5), rng.uniform(0.1, 2.0, size=5)
  std1[0] = 0.0  # singular covariances still follow the closed form
  std2[3] = 0.0
  want = np.sum((mu1 - mu2) ** 2) + np.sum((std1 - std2) ** 2)
  got = frechet.frechet_distance(mu1, np.diag(std1**2), mu2, np.diag(std2**2))
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_commuting_covariances_closed_form():
  # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: FD = |dmu|^2 + sum (sqrt a - sqrt b)^2.
  rng = np.random.default_rng(2)
  q = _random_rotation(rng, 7)
  a, b = rng.uniform(0.0, 3.0, size=7), rng.uniform(0.0, 3.0, size=7)
  mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
  got = frechet.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(got, want, rtol=1e-9)


def test_general_case_matches_sqrtm_route_and_is_symmetric():
  rng = np.random.default_rng(3)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  s1, s2 = _random_spd(rng, 8), _random_spd(rng, 8)
  got = frechet.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, _sqrtm_reference(mu1, s1, mu2, s2), rtol=1e-9)
  np.testing.assert_allclose(frechet.frechet_distance(mu2, s2, mu1, s1), got, rtol=1e-10)
  assert got > 0


def test_singular_product_is_finite_and_nonnegative():
  # Rank-deficient covariances (feature dim > sample count), where sqrtm(S1 S2) is ill-posed.
  rng = np.random.default_rng(4)
  s1, s2 = _random_spd(rng, 30, rank=5), _random_spd(rng, 30, rank=7)
  got = frechet.frechet_distance(np.zeros(30), s1, np.zeros(30), s2)
  assert np.isfinite(got) and got >= 0
  # Orthogonal supports: no overlap, so FD = tr S1 + tr S2 exactly.
  q = _random_rotation(rng, 30)
  p1 = (q[:, :5] * rng.uniform(0.5, 2, 5)) @ q[:, :5].T
  p2 = (q[:, 5:12] * rng.uniform(0.5, 2, 7)) @ q[:, 5:12].T
  got = frechet.frechet_distance(np.zeros(30), p1, np.zeros(30), p2)
  np.testing.assert_allclose(got, np.trace(p1) + np.trace(p2), rtol=1e-9)


def test_statistics_match_numpy_and_sample_fd_approaches_analytic():
  rng = np.random.default_rng(5)
  dim, n = 3, 40_000
  mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.5, 0.0])
  s1 = _random_spd(rng, dim)
  s2 = _random_spd(rng, dim)
  x1 = rng.multivariate_normal(mu1, s1, size=n)
  x2 = rng.multivariate_normal(mu2, s2, size=n)
  m, s = frechet.statistics(x1)
  np.testing.assert_allclose(m, x1.mean(0), rtol=1e-12)
  np.testing.assert_allclose(s, np.cov(x1.T), rtol=1e-12)
  assert m.dtype == s.dtype == np.float64 and s.shape == (dim, dim)
  analytic = frechet.frechet_distance(mu1, s1, mu2, s2)
  sampled = frechet.frechet_distance(*frechet.statistics(x1), *frechet.statistics(x2))
  # The estimator's error is O(sqrt(dim / n)) on values of order 1.
  assert abs(sampled - analytic) < 0.03 * max(analytic, 1.0), (sampled, analytic)


def test_bad_shapes_raise():
  with pytest.raises(ValueError):
    frechet.statistics(np.zeros((1, 3)))
  with pytest.raises(ValueError):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


@pytest.mark.parametrize("n1, n2", [(10, 13), (60, 50)])  # fewer / more samples than features
def test_feature_distance_matches_the_covariance_route(n1, n2):
  rng = np.random.default_rng(1)
  real = rng.normal(size=(n1, 40)) @ rng.normal(size=(40, 40))
  fake = 0.3 + rng.normal(size=(n2, 40)) @ rng.normal(size=(40, 40))
  expected = frechet.frechet_distance(*frechet.statistics(real), *frechet.statistics(fake))
  assert frechet.feature_distance(real, fake) == pytest.approx(expected, rel=1e-9)
  assert frechet.feature_distance(real, real) == pytest.approx(0.0, abs=1e-8)
