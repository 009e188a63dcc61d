"""Tests of sbmae.models.score: the prior's score networks.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sbmae.models import score as score_lib
from sbmae.stages import prior as prior_stage


def test_latent_unet_shapes_and_errors(random_like):
  dims = (16, 16, 16)
  model = score_lib.LatentUNet(dims=dims, width=8, mults=(1, 2), num_res_blocks=1,
                               time_embed_dim=16)
  params = random_like(jax.eval_shape(lambda: prior_stage.init_params(model, jax.random.PRNGKey(0), 48)))
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
      random_like(jax.eval_shape(lambda: prior_stage.init_params(bad, jax.random.PRNGKey(0), sum(bad_dims))))


def test_get_model_from_config():
  prior = dict(model="unet", hidden=32, num_layers=1, time_embed_dim=16,
               width=8, mults=(1, 2), num_res_blocks=1)
  model = score_lib.get_model(prior, (16, 16))
  assert isinstance(model, score_lib.LatentUNet) and model.width == 8
  assert model.num_res_blocks == 1
  model = score_lib.get_model(dict(prior, model="mlp"), (3, 5))
  assert isinstance(model, score_lib.ScoreMLP) and model.hidden == 32
  out = model.apply({"params": prior_stage.init_params(model, jax.random.PRNGKey(0), 8)}, jnp.ones((2, 8)), jnp.ones((2,)),
                    jnp.zeros((2, 8)))
  assert out.shape == (2, 8)
