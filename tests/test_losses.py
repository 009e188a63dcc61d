"""Tests of sbmae.diffusion.losses: denoising score matching, conditioning tasks, the Gaussian base.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sbmae.diffusion import losses
from sbmae import testing
from sbmae.diffusion import sample as sample_lib
from sbmae.diffusion import sde as sde_lib
from sbmae.models import score as score_lib
from sbmae.stages import prior as prior_stage


SDE = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0)


def test_dsm_training_recovers_gaussian():
  """A small ScoreMLP trained with masking samples the joint and conditionals."""
  dims = (2, 2)
  mu, sigma = testing.random_gaussian(sum(dims), [0.3, 0.6, 1.0, 1.8], seed=1)
  chol = jnp.asarray(np.linalg.cholesky(sigma), jnp.float32)
  model = score_lib.ScoreMLP(hidden=64, num_layers=2, time_embed_dim=32)
  loss_fn = losses.get_dsm_loss_fn(SDE, model, dims,
                                   clean_count_probs=losses.clean_count_probs("uniform", 0.0, 2))
  num_steps = 2000
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, num_steps))
  params = prior_stage.init_params(model, jax.random.PRNGKey(0), 4)
  base = jax.random.PRNGKey(1)

  def train_step(i, carry):
    params, opt_state = carry
    data_key, loss_key = jax.random.split(jax.random.fold_in(base, i))
    batch = mu + jax.random.normal(data_key, (512, 4)) @ chol.T
    grads, _ = jax.grad(loss_fn, has_aux=True)(params, loss_key, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, _ = jax.jit(lambda c: jax.lax.fori_loop(0, num_steps, train_step, c))(
      (params, tx.init(params)))
  score_fn = losses.get_score_fn(SDE, model)
  key = jax.random.PRNGKey(3)

  x = sample_lib.get_sampler(SDE, score_fn, dims)(
      key, params, jnp.zeros((2000, 4)), np.zeros(2, bool))
  mean_err, cov_err = testing.whitened_errors(np.asarray(x), mu, sigma)
  assert mean_err < 0.2 and cov_err < 0.25, (mean_err, cov_err)

  mask = np.array([True, False])
  coords = np.repeat(mask, dims)
  y = mu + np.asarray(chol) @ np.random.RandomState(2).randn(4)
  x = sample_lib.get_sampler(SDE, score_fn, dims, clean_conditioning=True)(
      key, params, jnp.broadcast_to(jnp.asarray(y, jnp.float32), (2000, 4)), mask)
  mean, cov, _ = testing.gaussian_conditional(mu, sigma, coords, y)
  mean_err, cov_err = testing.whitened_errors(np.asarray(x)[:, ~coords], mean, cov)
  assert mean_err < 0.2 and cov_err < 0.25, (mean_err, cov_err)


class _Probe(nn.Module):
  """Predicts eps = `offset` on every coordinate of an example with any clean
  coordinate, 0 on unconditional ones, plus a huge value everywhere unless the
  clean coordinates of x_t equal `clean_value` and the absent ones 0."""
  offset: float
  clean_value: float

  @nn.compact
  def __call__(self, x, t, clean_mask):
    del t
    self.param("unused", nn.initializers.zeros, (1,))
    clean = (clean_mask == sample_lib.CLEAN).astype(x.dtype)
    absent = (clean_mask == sample_lib.ABSENT).astype(x.dtype)
    leak = jnp.sum(clean * jnp.abs(x - self.clean_value) + absent * jnp.abs(x),
                   axis=-1, keepdims=True)
    conditional = jnp.max(clean, axis=-1, keepdims=True)
    return self.offset * conditional + 1e3 * leak + jnp.zeros_like(x)


def test_dsm_loss_weighs_every_example_equally():
  """Each example is averaged over its own diffused coordinates.

  With eps_hat = 10 on conditional examples and 0 on unconditional ones, an
  example's loss is ~1 + 100 if it has a clean modality and ~1 otherwise. With
  k uniform on {0, 1, 2} (dims 2, 2, 2) the per-example mean is
  1/3 * 1 + 2/3 * 101 = 67.7, where one mean over the batch's diffused
  coordinates (6, 4 and 2 of them for k = 0, 1, 2) would give 51.
  """
  dims = (2, 2, 2)
  batch = jnp.full((4096, 6), 0.7)
  model = _Probe(offset=10.0, clean_value=0.7)
  params = prior_stage.init_params(model, jax.random.PRNGKey(0), 6)
  probs = losses.clean_count_probs("uniform", 0.0, 3)
  loss_fn = jax.jit(losses.get_dsm_loss_fn(SDE, model, dims, clean_count_probs=probs,
                                           gaussian_base=False))
  loss, metrics = loss_fn(params, jax.random.PRNGKey(0), batch)
  # No leak: clean coordinates hold x_0 exactly.
  assert float(loss) == pytest.approx(1 + 2 / 3 * 100, rel=0.03), metrics
  shares = [float(metrics[f"share_k{k}"]) for k in range(3)]
  assert sum(shares) == pytest.approx(1.0)
  assert all(abs(v - 1 / 3) < 0.03 for v in shares), shares
  assert float(metrics["clean_fraction"]) == pytest.approx(1 / 3, abs=0.03)
  assert float(metrics["absent_share"]) == 0.0
  # Absent modalities are zeroed (no leak) and conditional on nothing: with
  # every conditioning made absent, every example is unconditional (loss ~1).
  loss_fn = losses.get_dsm_loss_fn(SDE, model, dims, clean_count_probs=probs,
                                   absent_prob=1.0, gaussian_base=False)
  loss, metrics = loss_fn(params, jax.random.PRNGKey(0), batch)
  assert float(loss) == pytest.approx(1.0, abs=0.05)
  assert float(metrics["absent_share"]) == pytest.approx(2 / 3, abs=0.03)
  assert float(metrics["clean_fraction"]) == 0.0
  # The default is unconditional training: nothing clean, every coordinate counts.
  loss, metrics = losses.get_dsm_loss_fn(SDE, model, dims, gaussian_base=False)(
      params, jax.random.PRNGKey(0), batch)
  assert float(metrics["share_k0"]) == 1.0 and float(metrics["clean_fraction"]) == 0.0
  assert float(loss) == pytest.approx(1.0, abs=0.05)


def test_clean_set_sizes_follow_the_configured_distribution():
  """k ~ probs over 0..M-1, then a uniform subset of size k; never all clean."""
  m, n = 4, 40000
  probs = losses.clean_count_probs("1,2,3,4", 0.2, m)
  np.testing.assert_allclose(probs, [0.2 + 0.08, 0.16, 0.24, 0.32])
  counts, clean, absent = jax.jit(losses.draw_tasks, static_argnums=(1, 2, 3))(
      jax.random.PRNGKey(0), n, tuple(probs), 0.25)
  counts, clean, absent = (np.asarray(v) for v in (counts, clean, absent))
  chosen = clean | absent
  assert not np.any(clean & absent)
  np.testing.assert_array_equal(chosen.sum(-1), counts)
  assert counts.max() <= m - 1  # never all clean
  shares = np.bincount(counts, minlength=m) / n
  np.testing.assert_allclose(shares, probs, atol=4 * np.sqrt(0.25 / n))
  # Absent replaces the whole clean set of a quarter of the examples.
  dropped = absent.any(-1)
  assert not np.any(clean[dropped])
  assert abs(dropped[counts > 0].mean() - 0.25) < 0.015
  # Given k, every subset of size k is equally likely (here: each modality
  # is in it with probability k / M).
  for k in range(1, m):
    np.testing.assert_allclose(chosen[counts == k].mean(0), k / m, atol=0.025)
  np.testing.assert_allclose(losses.clean_count_probs("uniform", 0.1, 5),
                             [0.28, 0.18, 0.18, 0.18, 0.18])
  np.testing.assert_allclose(losses.clean_count_probs("none", 0.0, 3), [1, 0, 0])
  for bad in ("1,2,3", "uniformly", (1, -1, 1, 1)):
    with pytest.raises(ValueError, match="clean_count_dist"):
      losses.clean_count_probs(bad, 0.0, m)


@pytest.mark.parametrize("sde", [SDE, sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)],
                         ids=["vp", "ve"])
def test_gaussian_base_is_the_exact_score_of_standard_normal_latents(sde):
  # An untrained ScoreMLP outputs 0 (zero-initialised last layer), so with the
  # Gaussian base the score is -x / (alpha^2 + std^2): the exact score of
  # N(0, I) data diffused to N(0, (alpha^2 + std^2) I) (= -x under VP, which
  # leaves N(0, I) invariant). Its DSM loss is then the minimum for N(0, I)
  # data, E[Var(z | x_t)] = alpha^2 / (alpha^2 + std^2) per coordinate.
  model = score_lib.ScoreMLP(hidden=16, num_layers=1, time_embed_dim=8)
  params = prior_stage.init_params(model, jax.random.PRNGKey(0), 6)
  score_fn = losses.get_score_fn(sde, model, gaussian_base=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 6))
  for t in (0.01, 0.3, 1.0):
    alpha, std = (float(v) for v in sde.marginal_coeffs(t))
    np.testing.assert_allclose(score_fn(params, x, jnp.full((5,), t), jnp.zeros_like(x)),
                               -x / (alpha ** 2 + std ** 2), rtol=1e-5, atol=1e-5)
  without = losses.get_score_fn(sde, model, gaussian_base=False)
  np.testing.assert_allclose(without(params, x, jnp.full((5,), 0.3), jnp.zeros_like(x)), 0.0)
  data = jax.random.normal(jax.random.PRNGKey(2), (20000, 6))
  loss, _ = losses.get_dsm_loss_fn(sde, model, (3, 3))(params, jax.random.PRNGKey(3), data)
  alpha, std = (np.asarray(v, np.float64)
                for v in sde.marginal_coeffs(jnp.asarray(np.linspace(1e-5, 1.0, 10001))))
  expected = np.mean(alpha ** 2 / (alpha ** 2 + std ** 2))
  assert float(loss) == pytest.approx(expected, abs=0.01)
