"""Tests of sbmae.reduction.diagnostics: H blocks, the Stein test, dependent directions."""

import jax
import jax.numpy as jnp
import numpy as np

from sbmae.reduction import closed_form
from sbmae.reduction import diagnostics


def test_eigenvalues_take_the_energy_correction():
  # A correction c I in every block adds c to every eigenvalue and keeps the
  # eigenvectors (the z-scores test the fitted s and do not move).
  dims, x = (3, 2), jax.random.normal(jax.random.key(1), (400, 5))
  base = {"linear": jnp.diag(jnp.asarray([0.9, 0.5, 0.1, 0.7, 0.3]))}
  sums, count = diagnostics.diagnostic_blocks(closed_form.closed_form_score, base, x,
                                              dims, 100)
  blocks = [h / count for h in sums]
  moments = diagnostics.block_second_moments(x, dims)
  run = lambda corrections: diagnostics.block_eigen_z_scores(
      closed_form.closed_form_score, base, blocks, x, dims, 100,
      closed_form.closed_form_curvature, moments, corrections)
  for (lam, vec, _, z), (lam_c, vec_c, _, z_c) in zip(
      run(None), run([0.25 * jnp.eye(d) for d in dims])):
    np.testing.assert_allclose(lam_c, lam + 0.25, rtol=1e-5)
    np.testing.assert_allclose(np.abs(vec_c), np.abs(vec), atol=1e-5)
    np.testing.assert_allclose(z_c, z, rtol=1e-3)


def test_diagnostic_blocks_match_direct_sum():
  rs = np.random.RandomState(6)
  dims = (3, 5, 2)
  b = jnp.asarray(rs.randn(10, 10), jnp.float32)
  x = jnp.asarray(rs.randn(1000, 10), jnp.float32)  # 3.9 batches of 256
  score_fn = lambda params, x: x @ params.T
  sums, count = diagnostics.diagnostic_blocks(score_fn, b, x, dims, 256)
  s = np.asarray(x @ b.T, np.float64)
  assert float(count) == 1000
  for block, (lo, hi) in zip(sums, [(0, 3), (3, 8), (8, 10)]):
    np.testing.assert_allclose(block, s[:, lo:hi].T @ s[:, lo:hi], rtol=1e-4,
                               atol=1e-2)


def test_stein_cross_term_matches_closed_form():
  # For x ~ N(0, Sigma), s*(x) = (I - Sigma^{-1}) x; for s(x) = B x,
  # E[(u.s)(u.s*)] = u^T B (Sigma - I) u, and 0 where s* has no component.
  rs = np.random.RandomState(3)
  d = 5
  sigma = np.diag([3.0, 0.5, 1.0, 1.0, 1.0])
  x = jnp.asarray(rs.randn(20000, d) @ np.sqrt(sigma), jnp.float32)
  b = jnp.asarray(rs.randn(d, d), jnp.float32)
  expected = np.diag(np.asarray(b) @ (sigma - np.eye(d)))
  energy = np.diag(np.asarray(b) @ sigma @ np.asarray(b).T)
  for moments in (None, jnp.asarray(np.diag(sigma), jnp.float32)):
    z, mean, e = diagnostics.direction_z_scores(
        lambda p, v: v @ p.T, b, x, jnp.eye(d), 512, second_moments=moments)
    np.testing.assert_allclose(mean, expected, atol=0.05)
    np.testing.assert_allclose(e, energy, rtol=0.05)
    assert np.all(np.abs(np.asarray(z)[2:]) < 4) and np.all(np.abs(z[:2]) > 10)


def test_control_variate_tames_a_heavy_tailed_direction():
  # x ~ t_3 at unit variance and its exact score ratio s(x) = x - 4x / (1 + x^2):
  # E[s^2] = J - 1 = 1, but s^2 ~ x^2 has no finite variance, so the plain mean
  # over 4,000 samples is off by ~100% for some draws (seeds 3 and 7); with the
  # control variate (u.x)^2 of known mean 1 every draw is within 6%.
  score = lambda p, v: v - 4 * v / (1 + v * v)
  plain, controlled = [], []
  for seed in range(8):
    x = np.random.RandomState(seed).standard_t(3.0, size=(4000, 1)) / np.sqrt(3.0)
    x = jnp.asarray(x, jnp.float32)
    z0, _, e0 = diagnostics.direction_z_scores(score, None, x, jnp.ones((1, 1)), 512)
    z1, _, e1 = diagnostics.direction_z_scores(score, None, x, jnp.ones((1, 1)), 512,
                                               second_moments=jnp.ones(1))
    plain.append(float(e0[0]))
    controlled.append(float(e1[0]))
    assert z1[0] > 10 and z1[0] >= z0[0]
  assert max(abs(e - 1) for e in plain) > 0.5
  np.testing.assert_allclose(controlled, 1.0, atol=0.06)


def test_dependent_directions_find_what_depends_nonlinearly_on_the_found_ones():
  # Block a holds y1 ~ N(0, 1); block b holds (y1^2 - 1) / sqrt(2), linearly
  # uncorrelated with y1 but a function of it; all else is independent noise.
  # Given y1's direction, exactly b's direction must come back.
  rs = np.random.RandomState(0)
  n, d = 12000, 5
  y = rs.randn(n, 2 * d)
  y[:, d] = (y[:, 0] ** 2 - 1) / np.sqrt(2)
  rot_a, rot_b = (np.linalg.qr(rs.randn(d, d))[0] for _ in range(2))
  x = jnp.asarray(np.concatenate([y[:, :d] @ rot_a.T, y[:, d:] @ rot_b.T], 1), jnp.float32)
  u = jnp.zeros((2 * d, 1)).at[:d, 0].set(jnp.asarray(rot_a[:, 0], jnp.float32))
  found = diagnostics.dependent_directions(x[:9000], x[9000:], u, (d, d), significance=4.0)
  assert found.shape == (2 * d, 1)
  np.testing.assert_allclose(np.asarray(found[:d]), 0.0)
  assert abs(float(found[d:, 0] @ rot_b[:, 0])) > np.cos(np.radians(5))
  # Nothing depends on a direction of pure noise.
  noise = jnp.zeros((2 * d, 1)).at[:d, 0].set(jnp.asarray(rot_a[:, 1], jnp.float32))
  assert diagnostics.dependent_directions(
      x[:9000], x[9000:], noise, (d, d), significance=4.0).shape == (2 * d, 0)
