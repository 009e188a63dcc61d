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
  out = model.apply({"params": prior_stage.init_params(model, jax.random.PRNGKey(0), 8)}, jnp.ones((2, 8)), jnp.ones((2,)),
                    jnp.zeros((2, 8)))
  assert out.shape == (2, 8)
