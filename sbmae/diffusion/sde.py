"""Forward SDEs for the latent score prior (score_sde conventions, in JAX).

Each SDE is a small frozen dataclass whose methods are pure functions of
arrays, so an instance can be closed over inside jitted code. Latents are flat
arrays x of shape [B, D] (any trailing shape works); times t are [B] (or
scalars) in [0, T] and are broadcast against x's trailing axes.

Both SDEs have a Gaussian perturbation kernel
  p_t(x_t | x_0) = N(alpha(t) x_0, std(t)^2 I),
exposed by `marginal_coeffs(t) -> (alpha, std)`; the score model, the loss and
the sampler are written in terms of it, so they are SDE-agnostic.
"""

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def expand_like(t, x):
  """Reshapes t ([B] or scalar) so it broadcasts against x ([B, ...])."""
  t = jnp.asarray(t, x.dtype)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


class _UnitTime:
  """Both SDEs run on t in [0, T] with T = 1."""

  @property
  def T(self) -> float:  # pylint: disable=invalid-name
    return 1.0


@dataclasses.dataclass(frozen=True)
class VPSDE(_UnitTime):
  """Variance-preserving SDE dx = -beta(t)/2 x dt + sqrt(beta(t)) dW.

  beta(t) = beta_min + t (beta_max - beta_min) on t in [0, 1]; the marginal is
  N(alpha x_0, (1 - alpha^2) I) with log alpha(t) = -t^2 (beta_max -
  beta_min) / 4 - t beta_min / 2 (Song et al. 2021, eq. 29-33).

  Attributes:
    beta_min: beta(0).
    beta_max: beta(1).
    N: number of discretisation steps of the DDPM chain this SDE is the limit
      of; sets the Langevin corrector's step size (`langevin_alpha`).
  """
  beta_min: float = 0.1
  beta_max: float = 20.0
  N: int = 1000

  def beta(self, t):
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def sde(self, x, t):
    """Returns (drift [B, D], diffusion broadcastable to x)."""
    beta_t = expand_like(self.beta(t), x)
    return -0.5 * beta_t * x, jnp.sqrt(beta_t)

  def marginal_coeffs(self, t) -> Tuple[jax.Array, jax.Array]:
    """Returns (alpha(t), std(t)) of the kernel N(alpha x_0, std^2 I), shaped like t."""
    log_alpha = (-0.25 * t ** 2 * (self.beta_max - self.beta_min)
                 - 0.5 * t * self.beta_min)
    # -expm1 keeps std accurate for small t, where 1 - exp(2 log_alpha) cancels.
    return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))

  def prior_sampling(self, rng, shape, dtype=jnp.float32):
    return jax.random.normal(rng, shape, dtype)

  def _discrete_betas(self):
    return jnp.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

  def _timestep(self, t):
    return jnp.clip((t * (self.N - 1) / self.T).astype(jnp.int32), 0, self.N - 1)

  def langevin_alpha(self, t):
    """The `alpha` of score_sde's LangevinCorrector step size: 1 - beta_i."""
    return 1.0 - self._discrete_betas()[self._timestep(t)]


@dataclasses.dataclass(frozen=True)
class VESDE(_UnitTime):
  """Variance-exploding SDE dx = sigma(t) sqrt(2 log(sigma_max/sigma_min)) dW.

  sigma(t) = sigma_min (sigma_max / sigma_min)^t; the marginal is
  N(x_0, sigma(t)^2 I) (the sigma_min^2 offset is neglected, as in score_sde).

  Attributes:
    sigma_min: noise scale at t = 0.
    sigma_max: noise scale at t = 1; should exceed the data's diameter.
  """
  sigma_min: float = 0.01
  sigma_max: float = 50.0

  def sigma(self, t):
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

  def sde(self, x, t):
    diffusion = self.sigma(t) * np.sqrt(
        2 * np.log(self.sigma_max / self.sigma_min))
    return jnp.zeros_like(x), expand_like(diffusion, x)

  def marginal_coeffs(self, t):
    t = jnp.asarray(t, jnp.float32)
    return jnp.ones_like(t), self.sigma(t)

  def prior_sampling(self, rng, shape, dtype=jnp.float32):
    return self.sigma_max * jax.random.normal(rng, shape, dtype)

  def langevin_alpha(self, t):
    return jnp.ones_like(jnp.asarray(t, jnp.float32))


SDES = {"vpsde": VPSDE, "vesde": VESDE}


def get_sde(config):
  """Builds the SDE named by `config.name` from the config's matching fields.

  Args:
    config: mapping (e.g. the `sde` ConfigDict) with `name` in `SDES`; every
      other key that names a field of that SDE class (beta_min, beta_max,
      sigma_min, sigma_max, N) is passed on, the rest are left alone so one
      config section can hold the parameters of several SDEs.

  Returns:
    The SDE instance.
  """
  if config["name"] not in SDES:
    raise ValueError(f"Unknown SDE {config['name']!r}; known: {sorted(SDES)}.")
  cls = SDES[config["name"]]
  kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls)
            if f.name in config}
  return cls(**kwargs)
