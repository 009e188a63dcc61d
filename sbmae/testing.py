"""Analytic cases with known answers, shared by the tests and the benchmarks.

Closed forms the code is checked against: the diffused score of a Gaussian,
its conditionals, the diagnostic matrix H of a Gaussian, and the H eigenvalue
of a symmetric two-component mixture.
"""

import jax.numpy as jnp
import numpy as np


def gaussian_score_fn(sde, mu, sigma, sign=1.0):
  """The exact score of N(mu, sigma) diffused by `sde`, as a prior score_fn.

  Under the kernel x_t = alpha x_0 + std z the marginal is
  N(alpha mu, alpha^2 sigma + std^2 I), computed in sigma's eigenbasis.

  Args:
    sde: forward SDE with marginal_coeffs(t) -> (alpha, std).
    mu: [D] mean.
    sigma: [D, D] covariance.
    sign: -1 gives the wrong-signed score (tests must tell them apart).

  Returns:
    score_fn(params, x [B, D], t [B], clean_mask) -> [B, D] (params and the
    mask are ignored).
  """
  lam, q = np.linalg.eigh(sigma)
  lam, q, mu = (jnp.asarray(v, jnp.float32) for v in (lam, q, mu))

  def score_fn(params, x, t, clean_mask):
    del params, clean_mask
    a, s = sde.marginal_coeffs(t)
    r = (x - a[:, None] * mu) @ q
    return -sign * (r / (a[:, None] ** 2 * lam + s[:, None] ** 2)) @ q.T
  return score_fn


def gaussian_conditional(mu, sigma, observed, y):
  """Law of the unobserved coordinates of N(mu, sigma) given x[observed] = y[observed].

  Args:
    mu: [D] mean.
    sigma: [D, D] covariance.
    observed: bool [D] mask.
    y: [D] values (only the observed ones are read).

  Returns:
    (mean [U], covariance [U, U], gain [U, O]) of the unobserved coordinates.
  """
  o, u = observed, ~observed
  gain = sigma[np.ix_(u, o)] @ np.linalg.inv(sigma[np.ix_(o, o)])
  mean = mu[u] + gain @ (y[o] - mu[o])
  cov = sigma[np.ix_(u, u)] - gain @ sigma[np.ix_(o, u)]
  return mean, cov, gain


def gaussian_h(sigma):
  """H = E[s s^T] of whitened-reference N(0, sigma): Sigma - 2 I + Sigma^{-1}.

  For x ~ N(0, sigma) and the reference N(0, I) the score ratio is linear,
  s(x) = (I - Sigma^{-1}) x, hence this closed form.
  """
  sigma = np.asarray(sigma, np.float64)
  return sigma - 2 * np.eye(len(sigma)) + np.linalg.inv(sigma)


def bimodal_eigenvalue(a):
  """E[(d/dy log p(y) + y)^2] for p = (N(-a, 1 - a^2) + N(a, 1 - a^2)) / 2.

  The H eigenvalue of a unit-variance symmetric mixture direction (about 2.94
  for a = 0.9), by quadrature.
  """
  var = 1 - a * a
  y = np.linspace(-9, 9, 200001)
  g_plus = np.exp(-(y - a)**2 / (2 * var))
  g_minus = np.exp(-(y + a)**2 / (2 * var))
  p = 0.5 * (g_plus + g_minus) / np.sqrt(2 * np.pi * var)
  dlogp = -((y - a) * g_plus + (y + a) * g_minus) / (var * (g_plus + g_minus))
  return float(np.sum(p * (dlogp + y)**2) * (y[1] - y[0]))
