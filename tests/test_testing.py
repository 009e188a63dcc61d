"""The synthetic laws of sbmae.testing that the reduction benchmark scores against."""

import numpy as np
import pytest

from sbmae import latents as latents_lib
from sbmae import testing

# Every kind of structure, two blocks of 6 dims.
_ALL_KINDS = [[("shared", 0.4), ("bimodal", 0.9), ("pair", 0.7)],
              [("shared", 0.4), ("pair", 0.7), ("student", 4.0)]]


def _log_density(structure, latents, truth, shared):
  """log pi(z) [n] of `synthetic_latents`' law, written out term by term."""
  params = {f"m{m}": [p for p in parts for _ in range(2 if p[0] == "shared" else 1)]
            for m, parts in enumerate(structure)}
  y = {n: latents[n] @ truth[n][0] for n in latents}
  total = 0.0
  pairs = []
  for n, z in latents.items():
    total = total - 0.5 * (np.sum(z * z, -1) - np.sum(y[n] ** 2, -1))  # N(0, 1) rest
    for j, (kind, p) in enumerate(params[n]):
      t = y[n][:, j]
      if kind == "bimodal":
        v = 1 - p * p
        total = total + np.log(np.exp(-(t - p) ** 2 / (2 * v)) + np.exp(-(t + p) ** 2 / (2 * v)))
      elif kind == "student":
        total = total - (p + 1) / 2 * np.log1p(t * t / (p - 2))
      elif kind == "pair":
        pairs.append((t, p))
  for (u, rho), (w, _) in zip(pairs[::2], pairs[1::2]):
    total = total - (u * u - 2 * rho * u * w + w * w) / (2 * (1 - rho * rho))
  log_class = 0.0
  for n, (mu, v) in shared.items():
    log_class = log_class - np.sum((y[n][:, None, :2] - mu[None]) ** 2, -1) / (2 * v)
  top = log_class.max(1)
  return total + top + np.log(np.sum(np.exp(log_class - top[:, None]), 1))


def test_exact_scores_are_the_gradient_of_the_log_density():
  latents, truth, shared = testing.synthetic_latents(_ALL_KINDS, 50, seed=3, dim=6)
  latents = {n: v.astype(np.float64) for n, v in latents.items()}
  scores = testing.exact_scores(_ALL_KINDS, latents, truth, shared)
  h = 1e-5
  for n in latents:
    for i in range(6):
      plus = dict(latents, **{n: latents[n] + h * np.eye(6)[i]})
      minus = dict(latents, **{n: latents[n] - h * np.eye(6)[i]})
      numeric = (_log_density(_ALL_KINDS, plus, truth, shared)
                 - _log_density(_ALL_KINDS, minus, truth, shared)) / (2 * h)
      np.testing.assert_allclose(scores[n][:, i], numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("law,param,eigenvalue", [
    ("bimodal", 0.9, testing.bimodal_eigenvalue(0.9)),
    ("pair", 0.7, testing.correlated_pair_eigenvalue(0.7))])
def test_sample_eigenvalues_of_light_tails_approach_the_closed_forms(law, param, eigenvalue):
  structure = [[(law, param)], [("pair", 0.7)] if law == "pair" else []]
  latents, truth, shared = testing.synthetic_latents(structure, 60000, seed=0, dim=4)
  lam = testing.sample_eigenvalues(structure, latents, truth, shared,
                                   latents_lib.Whitening.fit(latents))
  np.testing.assert_allclose(lam["m0"], [eigenvalue], rtol=0.03)


def test_sample_eigenvalues_are_those_of_the_whitened_law():
  # "Whitening" by z -> 2 z turns N(0, Sigma) into N(0, 4 Sigma), whose H is
  # 4 Sigma - 2 I + Sigma^{-1} / 4: on the pair's direction 2 + 1 / (4 (1 - rho^2)).
  structure = [[("pair", 0.8)], [("pair", 0.8)]]
  latents, truth, shared = testing.synthetic_latents(structure, 60000, seed=0, dim=4)
  double = latents_lib.Whitening(
      mean={n: np.zeros(4) for n in latents}, whitener={n: 2 * np.eye(4) for n in latents},
      unwhitener={n: 0.5 * np.eye(4) for n in latents})
  lam = testing.sample_eigenvalues(structure, latents, truth, shared, double)
  for n in latents:
    np.testing.assert_allclose(lam[n], [2 + 1 / (4 * (1 - 0.64))], rtol=0.02)


def test_sample_eigenvalues_follow_a_heavy_tail_that_the_whitening_rescales():
  # Issue #15's `mixed` m1 at seed 0: one Student-t_3 draw at ~100 sd makes the
  # sample variance 1.49, so the whitened law's eigenvalue is 1.65 (J c^2 - 2 +
  # 1/c^2) on average and ~2 on these samples, not the population's 1.0.
  latents, truth, shared = testing.synthetic_latents("mixed", 20000, seed=0)
  lam = testing.sample_eigenvalues("mixed", latents, truth, shared,
                                   latents_lib.Whitening.fit(latents))
  student = np.asarray(latents["m1"], np.float64) @ truth["m1"][0][:, 3]
  assert np.var(student) > 1.4
  assert lam["m1"][0] > 1.6
  np.testing.assert_allclose(lam["m4"], [testing.correlated_pair_eigenvalue(0.9)], rtol=0.05)
