"""Data parallelism: 4 (fake CPU) devices give the single-device results.

conftest.py starts JAX with --xla_force_host_platform_device_count=4.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sbmae.stages import autoencoders
from sbmae.data import modalities
from sbmae.diffusion import sample
from sbmae.reduction import diagnostics
from sbmae.diffusion import sde as sde_lib
from sbmae import training

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices")


def _meshes():
  return training.data_mesh(jax.devices()[:1]), training.data_mesh(jax.devices()[:4])


def test_train_step_on_4_devices_equals_1_device():
  config = ml_collections.ConfigDict(dict(kind="rae", latent_dim=8, widths=(4, 8, 8),
                                          blocks_per_stage=1, beta=0.01, noise_std=0.01))
  mods = modalities.polymnist(2)
  models = autoencoders.build_models(config, mods)
  tx = training.make_optimizer(1e-3, 10)
  step = training.make_train_step(autoencoders.get_loss_fn(models, mods, config), tx)
  batch = {m.name: np.random.default_rng(k).uniform(size=(16, 28, 28, 3)).astype(np.float32)
           for k, m in enumerate(mods)}
  results = []
  for mesh in _meshes():
    state = training.TrainState.create(
        autoencoders.init_params(models, mods, jax.random.PRNGKey(0)), tx)
    state = training.replicate(state, mesh)
    sharded = training.shard_batch(batch, mesh)
    assert len(sharded["m0"].sharding.device_set) == mesh.size
    for i in range(2):
      state, _ = step(state, sharded, jax.random.PRNGKey(i))
    results.append(jax.device_get(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), *results)


def test_diagnostic_blocks_on_4_devices_equal_1_device():
  dims = (3, 5)
  x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
  weight = jnp.asarray(np.random.default_rng(1).normal(size=(8, 8)), jnp.float32)
  score_fn = lambda params, v: jnp.tanh(v @ params)
  results = []
  for mesh in _meshes():
    xs = training.shard_batch(x, mesh)
    sums, count = jax.jit(diagnostics.diagnostic_blocks, static_argnums=(0, 3, 4))(
        score_fn, weight, xs, dims, 16)
    results.append((jax.device_get(sums), int(count)))
  for a, b in zip(results[0][0], results[1][0]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert results[0][1] == results[1][1] == 64
  s = np.tanh(x @ np.asarray(weight))
  np.testing.assert_allclose(results[1][0][0], s[:, :3].T @ s[:, :3], rtol=1e-4, atol=1e-4)


def test_sampling_on_4_devices_equals_1_device():
  dims = (2, 3)
  sde = sde_lib.VPSDE()
  score_fn = lambda params, x, t, clean: -x * params  # score of N(0, I / params)
  sampler = sample.get_sampler(sde, score_fn, dims, num_steps=5)
  observed = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
  mask = np.array([True, False])
  outs = [np.asarray(sampler(jax.random.PRNGKey(3), jnp.float32(1.0),
                             training.shard_batch(observed, mesh), mask))
          for mesh in _meshes()]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(outs[1][:, :2], observed[:, :2])
