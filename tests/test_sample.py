"""Tests for the any-subset sampler, the DSM loss and the score networks.

Gaussian data N(mu, Sigma) has a closed-form diffused score: under the VP-SDE
p_t = N(a mu, a^2 Sigma + s^2 I), with (a, s) = marginal_coeffs(t). Sample
moments are compared in whitened coordinates (w = L^-1 (x - m), L L^T = the
target covariance), where the sampling error of 4000 samples is ~0.016 on the
mean and ~0.022 on the covariance entries.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sbmae.diffusion import losses
from sbmae import latents
from sbmae.diffusion import sample as sample_lib
from sbmae.diffusion import sde as sde_lib
from sbmae.models import score as score_lib

SDE = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0)
DIMS = (2, 1, 2)
NUM = 4000


def _gaussian(dims, eigenvalues, seed=0):
  d = sum(dims)
  q, _ = np.linalg.qr(np.random.RandomState(seed).randn(d, d))
  sigma = q @ np.diag(eigenvalues) @ q.T
  mu = np.linspace(-1.0, 2.0, d)
  return mu, sigma


MU, SIGMA = _gaussian(DIMS, [0.4, 0.7, 1.0, 1.5, 2.5])


def _analytic_score_fn(mu, sigma, sign=1.0):
  """Score of the VP-diffused N(mu, sigma), via sigma's eigendecomposition."""
  lam, q = np.linalg.eigh(sigma)
  lam, q, mu = (jnp.asarray(v, jnp.float32) for v in (lam, q, mu))

  def score_fn(params, x, t, clean_mask):
    del params, clean_mask
    a, s = SDE.marginal_coeffs(t)
    r = (x - a[:, None] * mu) @ q
    return -sign * (r / (a[:, None] ** 2 * lam + s[:, None] ** 2)) @ q.T
  return score_fn


def _conditional(mu, sigma, coords, y):
  """Mean and covariance of the unobserved coordinates given x[coords] = y."""
  o, u = coords, ~coords
  gain = sigma[np.ix_(u, o)] @ np.linalg.inv(sigma[np.ix_(o, o)])
  mean = mu[u] + gain @ (y[o] - mu[o])
  cov = sigma[np.ix_(u, u)] - gain @ sigma[np.ix_(o, u)]
  return mean, cov, gain


def _clean_conditional_score_fn(mu, sigma, coords):
  """Exact score of p_t(x_u | clean x_o): N(a m(x_o), a^2 C + s^2 I) on u."""
  u = ~coords
  _, cov, gain = _conditional(mu, sigma, coords, mu)
  lam, q = np.linalg.eigh(cov)
  lam, q, gain = (jnp.asarray(v, jnp.float32) for v in (lam, q, gain))
  mu_o, mu_u = jnp.asarray(mu[coords], jnp.float32), jnp.asarray(mu[u], jnp.float32)

  def score_fn(params, x, t, clean_mask):
    del params
    a, s = SDE.marginal_coeffs(t)
    # The sampler must flag exactly the observed coordinates as clean.
    x = jnp.where(jnp.all(clean_mask == coords), x, jnp.nan)
    mean_u = mu_u + (x[:, coords] - mu_o) @ gain.T
    r = (x[:, u] - a[:, None] * mean_u) @ q
    score_u = -(r / (a[:, None] ** 2 * lam + s[:, None] ** 2)) @ q.T
    return jnp.zeros_like(x).at[:, u].set(score_u)
  return score_fn


def _whitened_errors(x, mean, cov):
  """(max |whitened mean|, max |whitened cov - I|) of samples x [N, d]."""
  w = np.linalg.solve(np.linalg.cholesky(cov), (x - mean).T).T
  d = len(mean)
  return (np.abs(w.mean(0)).max(),
          np.abs(np.cov(w.T).reshape(d, d) - np.eye(d)).max())


def _observation(seed=11):
  return MU + np.linalg.cholesky(SIGMA) @ np.random.RandomState(seed).randn(len(MU))


def _run(sampler, observed, mask, seed=0):
  observed = np.broadcast_to(np.asarray(observed, np.float32), (NUM, sum(DIMS)))
  return np.asarray(sampler(jax.random.PRNGKey(seed), None, observed,
                            np.asarray(mask)))


def test_unconditional_matches_gaussian_and_wrong_scores_fail():
  tol_mean, tol_cov = 0.08, 0.12

  def errors(score_fn):
    sampler = sample_lib.get_sampler(SDE, score_fn, DIMS, num_steps=100,
                                     corrector_steps=1)
    x = _run(sampler, np.zeros(sum(DIMS)), np.zeros(len(DIMS), bool))
    return _whitened_errors(x, MU, SIGMA)

  mean_err, cov_err = errors(_analytic_score_fn(MU, SIGMA))
  assert mean_err < tol_mean and cov_err < tol_cov, (mean_err, cov_err)
  # The check discriminates: a wrong sign, and a score of 1.3 Sigma, fail it.
  for wrong in (_analytic_score_fn(MU, SIGMA, sign=-1.0),
                _analytic_score_fn(MU, 1.3 * SIGMA)):
    mean_err, cov_err = errors(wrong)
    assert not (mean_err < tol_mean and cov_err < tol_cov), (mean_err, cov_err)


def test_final_denoising_is_tweedie_mean():
  """Stopping at a large eps exposes the final step: E[x_0 | x_t] of x_t ~ p_t.

  For Gaussian data, with C = a^2 Sigma + s^2 I, the denoised mean
  mu + a Sigma C^-1 (x_t - a mu) has mean mu and covariance a^2 Sigma C^-1 Sigma.
  """
  t_end = 0.3
  sampler = sample_lib.get_sampler(SDE, _analytic_score_fn(MU, SIGMA), DIMS,
                                   num_steps=60, corrector_steps=1, eps=t_end)
  x = _run(sampler, np.zeros(sum(DIMS)), np.zeros(len(DIMS), bool))
  a, s = (float(v) for v in SDE.marginal_coeffs(t_end))
  c = a ** 2 * SIGMA + s ** 2 * np.eye(len(MU))
  mean_err, cov_err = _whitened_errors(
      x, MU, a ** 2 * SIGMA @ np.linalg.solve(c, SIGMA))
  assert mean_err < 0.08 and cov_err < 0.12, (mean_err, cov_err)


def test_conditional_by_replacement_matches_gaussian_conditional():
  """Diffused-observation replacement, every non-trivial subset of modalities.

  Replacement is not exact: with few Langevin steps it leaves a bias (about
  0.25 whitened sd on the mean for the worst subset here at 100 steps and one
  corrector step, 0.15 with two), so this runs two corrector steps and allows
  0.2; the clean-conditioning test below checks the machinery tightly.
  """
  sampler = sample_lib.get_sampler(SDE, _analytic_score_fn(MU, SIGMA), DIMS,
                                   num_steps=100, corrector_steps=2)
  y = _observation()
  for mask in itertools.product([False, True], repeat=len(DIMS)):
    mask = np.array(mask)
    if mask.all() or not mask.any():
      continue
    coords = np.repeat(mask, DIMS)
    x = _run(sampler, y, mask)
    np.testing.assert_array_equal(x[:, coords], np.broadcast_to(
        y[coords].astype(np.float32), (NUM, coords.sum())))
    mean, cov, _ = _conditional(MU, SIGMA, coords, y)
    mean_err, cov_err = _whitened_errors(x[:, ~coords], mean, cov)
    assert mean_err < 0.2 and cov_err < 0.12, (mask, mean_err, cov_err)


@pytest.mark.parametrize("clean_conditioning", [False, True])
def test_what_the_model_sees_on_observed_coordinates(clean_conditioning):
  """Every score evaluation sees y diffused to t with fresh noise (or clean y)."""
  mask = np.array([False, True, True])
  coords = np.repeat(mask, DIMS)
  y = _observation()
  seen = []

  def probe_score_fn(params, x, t, clean_mask):
    del params
    jax.debug.callback(lambda *a: seen.append([np.asarray(v) for v in a]),
                       t, x, clean_mask)
    return jnp.zeros_like(x)

  num_steps, corrector_steps = 4, 2
  sampler = sample_lib.get_sampler(
      SDE, probe_score_fn, DIMS, num_steps=num_steps,
      corrector_steps=corrector_steps, clean_conditioning=clean_conditioning)
  jax.block_until_ready(_run(sampler, y, mask))
  assert len(seen) == num_steps * (1 + corrector_steps) + 1
  previous_noise = None
  for t, x, clean in seen:
    assert np.all(t == t[0])
    np.testing.assert_array_equal(clean, np.broadcast_to(
        coords if clean_conditioning else np.zeros_like(coords), clean.shape))
    if clean_conditioning:
      np.testing.assert_array_equal(x[:, coords], np.broadcast_to(
          y[coords].astype(np.float32), (NUM, coords.sum())))
      continue
    a, s = (float(v) for v in SDE.marginal_coeffs(t[0]))
    noise = (x[:, coords] - a * y[coords]) / s
    assert np.abs(noise.mean(0)).max() < 0.08 and np.abs(noise.std(0) - 1).max() < 0.06
    if previous_noise is not None:  # fresh noise at every evaluation
      assert np.abs(np.mean(noise * previous_noise, axis=0)).max() < 0.08
    previous_noise = noise


def test_clean_conditioning_with_exact_conditional_score():
  mask = np.array([True, False, True])
  coords = np.repeat(mask, DIMS)
  y = _observation()
  mean, cov, _ = _conditional(MU, SIGMA, coords, y)
  sampler = sample_lib.get_sampler(
      SDE, _clean_conditional_score_fn(MU, SIGMA, coords), DIMS,
      num_steps=100, corrector_steps=1, clean_conditioning=True)
  x = _run(sampler, y, mask)
  np.testing.assert_array_equal(x[:, coords], np.broadcast_to(
      y[coords].astype(np.float32), (NUM, coords.sum())))
  mean_err, cov_err = _whitened_errors(x[:, ~coords], mean, cov)
  assert mean_err < 0.08 and cov_err < 0.12, (mean_err, cov_err)
  # Conditioning on another value must move the samples: y shifted by 2 sd.
  y2 = y + 2.0 * np.sqrt(np.diag(SIGMA))
  mean_err, _ = _whitened_errors(_run(sampler, y2, mask)[:, ~coords], mean, cov)
  assert mean_err > 0.5


def test_one_compilation_serves_every_subset_and_per_example_masks():
  """Counts XLA compilations with the public jax.monitoring event listener.

  JAX records the duration of every backend compilation under
  '/jax/core/compile/backend_compile_duration' with the jitted function's name,
  so counting those events for `sample` counts cache misses of the sampler.
  """
  dims = (1, 2, 1)
  sampler = sample_lib.get_sampler(SDE, _analytic_score_fn(
      np.zeros(4), np.eye(4)), dims, num_steps=3, corrector_steps=1)
  observed = np.random.RandomState(0).randn(6, 4).astype(np.float32)
  masks = [np.array(m) for m in itertools.product([False, True], repeat=3)]
  compiled = []

  def listener(event, duration, **kwargs):
    del duration
    # The name reads "jit(sample)" in current JAX, "sample" in older ones.
    if event == "/jax/core/compile/backend_compile_duration" and (
        kwargs.get("fun_name") in ("sample", "jit(sample)")):
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    outs = [sampler(jax.random.PRNGKey(0), None, observed, m) for m in masks]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(compiled) == 1
  for m, out in zip(masks, outs):
    coords = np.repeat(m, dims)
    np.testing.assert_array_equal(np.asarray(out)[:, coords], observed[:, coords])
    assert np.all(np.asarray(out)[:, ~coords] != observed[:, ~coords])

  # Per-example masks [B, M]: each row keeps its own observed coordinates.
  per_example = np.stack([masks[i % 8] for i in range(6)])
  out = np.asarray(sampler(jax.random.PRNGKey(1), None, observed, per_example))
  coords = np.asarray(latents.modality_mask_to_coords(per_example, dims))
  np.testing.assert_array_equal(out[coords], observed[coords])
  assert np.all(out[~coords] != observed[~coords])


def _init(model, d, seed=0):
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((2, d)), jnp.ones((2,)),
                    jnp.zeros((2, d)))["params"]


def test_dsm_training_recovers_gaussian():
  """A small ScoreMLP trained with masking samples the joint and conditionals."""
  dims = (2, 2)
  mu, sigma = _gaussian(dims, [0.3, 0.6, 1.0, 1.8], seed=1)
  chol = jnp.asarray(np.linalg.cholesky(sigma), jnp.float32)
  model = score_lib.ScoreMLP(hidden=64, num_layers=2, time_embed_dim=32)
  loss_fn = losses.get_dsm_loss_fn(SDE, model, dims, mask_prob=0.5)
  num_steps = 2000
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, num_steps))
  params = _init(model, 4)
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
  score_fn = score_lib.get_score_fn(SDE, model)
  key = jax.random.PRNGKey(3)

  x = sample_lib.get_sampler(SDE, score_fn, dims)(
      key, params, jnp.zeros((2000, 4)), np.zeros(2, bool))
  mean_err, cov_err = _whitened_errors(np.asarray(x), mu, sigma)
  assert mean_err < 0.2 and cov_err < 0.25, (mean_err, cov_err)

  mask = np.array([True, False])
  coords = np.repeat(mask, dims)
  y = mu + np.asarray(chol) @ np.random.RandomState(2).randn(4)
  x = sample_lib.get_sampler(SDE, score_fn, dims, clean_conditioning=True)(
      key, params, jnp.broadcast_to(jnp.asarray(y, jnp.float32), (2000, 4)), mask)
  mean, cov, _ = _conditional(mu, sigma, coords, y)
  mean_err, cov_err = _whitened_errors(np.asarray(x)[:, ~coords], mean, cov)
  assert mean_err < 0.2 and cov_err < 0.25, (mean_err, cov_err)


class _Probe(nn.Module):
  """Predicts eps = 0 plus `clean_offset` on clean coordinates, plus a huge
  value everywhere unless the clean coordinates of x_t equal `clean_value`."""
  clean_offset: float
  clean_value: float

  @nn.compact
  def __call__(self, x, t, clean_mask):
    del t
    self.param("unused", nn.initializers.zeros, (1,))
    leak = jnp.sum(clean_mask * jnp.abs(x - self.clean_value), axis=-1,
                   keepdims=True)
    return self.clean_offset * clean_mask + 1e3 * leak + jnp.zeros_like(x)


def test_dsm_loss_masking():
  dims = (3, 2, 3)
  batch = jnp.full((1024, 8), 0.7)
  rng = jax.random.PRNGKey(0)

  def loss(offset, mask_prob):
    model = _Probe(clean_offset=offset, clean_value=0.7)
    loss_fn = losses.get_dsm_loss_fn(SDE, model, dims, mask_prob=mask_prob,
                                     gaussian_base=False)
    return loss_fn(_init(model, 8), rng, batch)

  # eps_hat = 0 gives the mean of noise^2 over diffused coordinates (~1): the
  # clean coordinates hold x_0 exactly (no leak), and their predictions,
  # however wrong, do not enter the loss.
  (l0, metrics), (l1, _) = loss(0.0, 0.5), loss(50.0, 0.5)
  assert float(l0) == pytest.approx(1.0, abs=0.08)
  assert float(l1) == float(l0)
  assert 0.35 < float(metrics["clean_fraction"]) < 0.65
  # Without masking nothing is clean and every coordinate counts.
  l2, metrics = loss(50.0, 0.0)
  assert float(metrics["clean_fraction"]) == 0.0
  assert float(l2) == pytest.approx(1.0, abs=0.08)


def _random_params(model, d, scale=0.1):
  """Random parameters of the right shapes without compiling `init`.

  Compiling a U-Net's init (a hundred truncated-normal draws) takes XLA ~10 s
  on this CPU; the tests below only need some non-degenerate weights.
  """
  shapes = jax.eval_shape(lambda: _init(model, d))
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  rs = np.random.RandomState(0)
  return jax.tree_util.tree_unflatten(
      tree, [jnp.asarray(scale * rs.randn(*l.shape), jnp.float32) for l in leaves])


def test_latent_unet_shapes_and_errors():
  dims = (16, 16, 16)
  model = score_lib.LatentUNet(dims=dims, width=8, mults=(1, 2), num_res_blocks=1,
                               time_embed_dim=16)
  params = _random_params(model, 48)
  x = jax.random.normal(jax.random.PRNGKey(1), (48,))
  # With generic weights every modality's output depends on every modality's
  # latent: the U-Net mixes them. Rows: x, then x with block k shifted.
  shifted = jnp.stack([x] + [x.at[16 * k:16 * (k + 1)].add(1.0)
                             for k in range(3)])
  out = jax.jit(model.apply)({"params": params}, shifted, jnp.full((4,), 0.5),
                             jnp.zeros((4, 48)))
  assert out.shape == (4, 48)
  change = np.abs(np.asarray(out[1:] - out[:1])).reshape(3, 3, 16).sum(-1)
  assert np.all(np.isfinite(change)) and np.all(change > 1e-4), change
  for bad_dims, match in [((16, 9, 16), "same perfect square"),
                          ((12, 12), "same perfect square"),
                          ((4, 4), "not divisible")]:
    bad = score_lib.LatentUNet(dims=bad_dims, width=8, mults=(1, 2, 2))
    with pytest.raises(ValueError, match=match):
      _random_params(bad, sum(bad_dims))


@pytest.mark.parametrize("size,stride", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 2),
                                         (3, 1)])
def test_conv3x3_matches_lax_convolution(size, stride):
  """The GEMM path (outputs <= 4 positions) and the lax path agree with lax."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3))
  conv = score_lib.Conv3x3(features=4, stride=stride)
  params = conv.init(jax.random.PRNGKey(1), x)
  expected = jax.lax.conv_general_dilated(
      x, params["params"]["kernel"], (stride, stride), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv.apply(params, x), expected, rtol=1e-5,
                             atol=1e-5)


def test_get_model_from_config():
  prior = dict(model="unet", hidden=32, num_layers=1, time_embed_dim=16,
               width=8, mults=(1, 2), num_res_blocks=1)
  model = score_lib.get_model(prior, (16, 16))
  assert isinstance(model, score_lib.LatentUNet) and model.width == 8
  assert model.num_res_blocks == 1
  model = score_lib.get_model(dict(prior, model="mlp"), (3, 5))
  assert isinstance(model, score_lib.ScoreMLP) and model.hidden == 32
  out = model.apply({"params": _init(model, 8)}, jnp.ones((2, 8)), jnp.ones((2,)),
                    jnp.zeros((2, 8)))
  assert out.shape == (2, 8)


def test_gaussian_base_is_the_exact_score_of_standard_normal_latents():
  # An untrained ScoreMLP outputs 0 (zero-initialised last layer), so with the
  # Gaussian base the score is std(t) x / -std(t) = -x: the score of N(0, I),
  # which VP diffusion leaves invariant. Its DSM loss is then 1 - std(t)^2 per
  # coordinate on average, the minimum for N(0, I) data.
  model = score_lib.ScoreMLP(hidden=16, num_layers=1, time_embed_dim=8)
  params = _init(model, 6)
  score_fn = score_lib.get_score_fn(SDE, model, gaussian_base=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 6))
  for t in (0.01, 0.3, 1.0):
    np.testing.assert_allclose(score_fn(params, x, jnp.full((5,), t), jnp.zeros_like(x)), -x,
                               rtol=1e-5, atol=1e-5)
  without = score_lib.get_score_fn(SDE, model, gaussian_base=False)
  np.testing.assert_allclose(without(params, x, jnp.full((5,), 0.3), jnp.zeros_like(x)), 0.0)
  data = jax.random.normal(jax.random.PRNGKey(2), (20000, 6))
  loss, _ = losses.get_dsm_loss_fn(SDE, model, (3, 3))(params, jax.random.PRNGKey(3), data)
  ts = np.linspace(1e-5, 1.0, 10001)
  expected = np.mean(1.0 - np.asarray(SDE.marginal_coeffs(jnp.asarray(ts))[1]) ** 2)
  assert float(loss) == pytest.approx(expected, abs=0.01)
