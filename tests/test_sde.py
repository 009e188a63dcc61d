"""Tests of sbmae.diffusion.sde: perturbation kernels against closed forms and the SDE."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

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
  alpha, std = sde.marginal_coeffs(jnp.float32(t_end))
  scale, mean = float(std), 1.5 * float(alpha)
  assert abs(float(x.mean()) - mean) < 4 * scale / np.sqrt(n) + 1e-2 * scale
  assert abs(float(x.std()) / scale - 1.0) < 0.03


def test_langevin_alpha_is_the_ddpm_chain_of_the_marginal():
  """The corrector's alpha_i = 1 - beta_i: prod_i sqrt(alpha_i) approximates alpha(1).

  They differ by O(sum_i beta_i^2) = O(1/N) (0.03 of -5.03 at N = 1000).
  """
  sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
  t = jnp.arange(sde.N) / (sde.N - 1)
  keep = np.sqrt(np.asarray(sde.langevin_alpha(t), np.float64))  # sqrt(1 - beta_i)
  alpha, _ = sde.marginal_coeffs(1.0)
  np.testing.assert_allclose(np.log(keep).sum(), np.log(alpha), rtol=1e-2)
  np.testing.assert_allclose(sde_lib.VESDE().langevin_alpha(t), 1.0)


@pytest.mark.parametrize("sde", SDES, ids=["vp", "ve"])
def test_prior_sampling_has_the_marginal_scale(sde):
  z = sde.prior_sampling(jax.random.PRNGKey(0), (4000, 3))
  _, std = sde.marginal_coeffs(1.0)
  assert abs(float(z.std()) / float(std) - 1.0) < 0.05


def test_get_sde_from_config():
  config = ml_collections.ConfigDict(dict(name="vpsde", beta_min=0.2, beta_max=10.0))
  assert sde_lib.get_sde(config) == sde_lib.VPSDE(beta_min=0.2, beta_max=10.0)
  ve = sde_lib.get_sde(dict(name="vesde", sigma_max=30.0, beta_min=0.1))
  assert ve == sde_lib.VESDE(sigma_max=30.0)
  with pytest.raises(ValueError, match="Unknown SDE"):
    sde_lib.get_sde(dict(name="subvp"))
