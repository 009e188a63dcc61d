"""Tests for sbmae.sde: perturbation kernels against closed forms and the SDE."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from sbmae.diffusion import sde as sde_lib

SDES = [sde_lib.VPSDE(beta_min=0.1, beta_max=20.0),
        sde_lib.VESDE(sigma_min=0.01, sigma_max=5.0)]


def test_vp_marginal_closed_form():
  sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0)
  t = np.array([1e-4, 0.1, 0.5, 1.0])
  # log alpha = -int_0^t beta(s) ds / 2, integrated by hand.
  log_alpha = -0.5 * (0.1 * t + 0.5 * (20.0 - 0.1) * t ** 2)
  alpha, std = sde.marginal_coeffs(jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(alpha, np.exp(log_alpha), rtol=1e-5)
  np.testing.assert_allclose(std, np.sqrt(1 - np.exp(2 * log_alpha)), rtol=1e-4)
  x0 = jnp.ones((4, 3))
  mean, std_b = sde.marginal_prob(x0, jnp.asarray(t, jnp.float32))
  assert mean.shape == (4, 3) and std_b.shape == (4, 1)
  np.testing.assert_allclose(mean[:, 0], np.exp(log_alpha), rtol=1e-5)


@pytest.mark.parametrize("sde", SDES, ids=["vp", "ve"])
def test_kernel_solves_moment_odes(sde):
  """For dx = f(t) x dt + g(t) dW: dm/dt = f m and dv/dt = 2 f v + g^2."""
  t = jnp.linspace(0.05, 0.95, 7)
  h = 1e-3
  x = jnp.ones((7, 1))

  def moments(tt):
    alpha, std = sde.marginal_coeffs(tt)
    return alpha, std ** 2

  (a_p, v_p), (a_m, v_m) = moments(t + h), moments(t - h)
  alpha, var = moments(t)
  drift, diffusion = sde.sde(x, t)
  f = drift[:, 0]  # drift of x = 1 is the coefficient f(t).
  g2 = diffusion[:, 0] ** 2
  np.testing.assert_allclose((a_p - a_m) / (2 * h), f * alpha, rtol=2e-2,
                             atol=1e-4)
  np.testing.assert_allclose((v_p - v_m) / (2 * h), 2 * f * var + g2,
                             rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("sde", SDES, ids=["vp", "ve"])
def test_marginal_matches_monte_carlo_simulation(sde):
  """Euler-Maruyama paths of the forward SDE match the closed-form kernel."""
  n, steps, t_end = 20000, 400, 0.6
  x0 = jnp.full((n, 1), 1.5)
  dt = t_end / steps

  def body(i, x):
    t = jnp.full((n,), i * dt)
    drift, diffusion = sde.sde(x, t)
    z = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), i), x.shape)
    return x + drift * dt + diffusion * jnp.sqrt(dt) * z

  x = jax.jit(lambda x: jax.lax.fori_loop(0, steps, body, x))(x0)
  mean, std = sde.marginal_prob(x0[:1], jnp.full((1,), t_end))
  scale = float(std[0, 0])
  assert abs(float(x.mean()) - float(mean[0, 0])) < 4 * scale / np.sqrt(n) + 1e-2 * scale
  assert abs(float(x.std()) / scale - 1.0) < 0.03


def test_ddpm_discretisation_matches_marginal():
  """The DDPM chain's sum_i log sqrt(1 - beta_i) approximates log alpha(1).

  They differ by O(sum_i beta_i^2) = O(1/N) (0.03 of -5.03 at N = 1000).
  """
  sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
  t = jnp.arange(sde.N) / (sde.N - 1)
  x = jnp.ones((sde.N, 1))
  f, g = sde.discretize(x, t)
  keep = 1.0 + f[:, 0]  # sqrt(1 - beta_i)
  np.testing.assert_allclose(keep ** 2 + g[:, 0] ** 2, 1.0, rtol=1e-6)
  alpha, _ = sde.marginal_coeffs(1.0)
  np.testing.assert_allclose(np.log(np.asarray(keep, np.float64)).sum(),
                             np.log(alpha), rtol=1e-2)
  np.testing.assert_allclose(sde.langevin_alpha(t), keep ** 2, rtol=1e-6)


@pytest.mark.parametrize("sde", SDES, ids=["vp", "ve"])
def test_prior_sampling_and_logp(sde):
  z = sde.prior_sampling(jax.random.PRNGKey(0), (4000, 3))
  _, std = sde.marginal_coeffs(1.0)
  assert abs(float(z.std()) / float(std) - 1.0) < 0.05
  expected = stats.norm.logpdf(np.asarray(z[:5]), scale=float(std)).sum(-1)
  np.testing.assert_allclose(sde.prior_logp(z[:5]), expected, rtol=1e-4)


def test_get_sde_from_config():
  config = ml_collections.ConfigDict(dict(name="vpsde", beta_min=0.2, beta_max=10.0))
  assert sde_lib.get_sde(config) == sde_lib.VPSDE(beta_min=0.2, beta_max=10.0)
  ve = sde_lib.get_sde(dict(name="vesde", sigma_max=30.0, beta_min=0.1))
  assert ve == sde_lib.VESDE(sigma_max=30.0)
  with pytest.raises(ValueError, match="Unknown SDE"):
    sde_lib.get_sde(dict(name="subvp"))
