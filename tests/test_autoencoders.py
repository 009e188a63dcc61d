"""Tests of the autoencoders stage (sbmae.stages.autoencoders): models and losses."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sbmae import errors
from sbmae import pipeline
from sbmae import training
from sbmae.stages import autoencoders
from sbmae.data import modalities


def test_reconstruction_losses_match_their_formulas():
  x = jnp.array([[0.0, 1.0, 0.5]])
  logits = jnp.array([[0.3, -1.2, 2.0]])
  p = jax.nn.sigmoid(logits)
  np.testing.assert_allclose(autoencoders.reconstruction_loss("mse", logits, x),
                             [np.sum((p - x) ** 2)], rtol=1e-6)
  bce = -(x * np.log(p) + (1 - x) * np.log(1 - p))
  np.testing.assert_allclose(autoencoders.reconstruction_loss("bernoulli", logits, x),
                             [np.sum(bce)], rtol=1e-5)


@pytest.mark.parametrize("kind,decoder_head", [("rae", "upsample"), ("vae", "upsample"),
                                               ("rae", "subpixel")])
def test_models_shapes_and_regulariser(kind, decoder_head):
  config = ml_collections.ConfigDict(dict(kind=kind, latent_dim=6, widths=(4, 8, 8),
                                          blocks_per_stage=1, decoder_head=decoder_head,
                                          beta=1.0, noise_std=0.0))
  mods = (modalities.Modality("img", "image", (28, 28, 3)),
          modalities.Modality("mask", "image", (32, 32, 1), "bernoulli"),
          modalities.Modality("vec", "vector", (18,), "bernoulli"))
  models = autoencoders.build_models(config, mods)
  params = autoencoders.init_params(models, mods, jax.random.PRNGKey(0))
  batch = {m.name: jnp.full((2,) + m.shape, 0.5) for m in mods}
  z = autoencoders.encode_fn(models)(params, batch)
  assert {n: v.shape for n, v in z.items()} == {"img": (2, 6), "mask": (2, 6), "vec": (2, 6)}
  out = autoencoders.decode_fn(models)(params, z)
  assert all(out[m.name].shape == (2,) + m.shape for m in mods)
  loss, metrics = autoencoders.get_loss_fn(models, mods, config)(
      params, jax.random.PRNGKey(1), batch)
  # The total is the sum of the per-modality losses, each above its
  # reconstruction term by beta * (regulariser >= 0).
  np.testing.assert_allclose(loss, sum(metrics[f"{m.name}/loss"] for m in mods), rtol=1e-5)
  for m in mods:
    rec = metrics[f"{m.name}/rec_per_dim"] * np.prod(m.shape)
    assert metrics[f"{m.name}/loss"] >= rec - 1e-4


def test_subpixel_head_replaces_the_full_resolution_layers():
  """Parameter counts of the two decoder heads, and no hidden layer at full resolution."""
  mod = modalities.Modality("img", "image", (28, 28, 3))
  width, channels = 4, 3

  def build(head):
    config = ml_collections.ConfigDict(dict(kind="rae", latent_dim=6, widths=(width, 8),
                                            blocks_per_stage=1, decoder_head=head))
    model = autoencoders.build_models(config, (mod,))["img"]
    return model, autoencoders.init_params({"img": model}, (mod,), jax.random.PRNGKey(0))["img"]

  built = {head: build(head) for head in ("upsample", "subpixel")}
  counts = {head: sum(x.size for x in jax.tree.leaves(params))
            for head, (_, params) in built.items()}
  # upsample: a 3x3 conv to 4 * width channels, a 5x5 conv to the image's channels;
  # subpixel: one 5x5 conv to 4 * channels.
  upsample = (9 * width * 4 * width + 4 * width) + (25 * width * channels + channels)
  subpixel = 25 * width * 4 * channels + 4 * channels
  assert counts["upsample"] - counts["subpixel"] == upsample - subpixel
  # The largest activation of the subpixel decoder before its output is at 16x16.
  model, params = built["subpixel"]
  jaxpr = jax.make_jaxpr(lambda p, z: model.apply(p, z, method="decode"))(
      params, jnp.zeros((1, 6)))
  full = [v.aval.shape for e in jaxpr.jaxpr.eqns for v in e.outvars
          if len(v.aval.shape) == 4 and v.aval.shape[1] == 32 and v.aval.shape[-1] != channels]
  assert not full, full


def test_vae_latents_are_posterior_samples_and_count_used_directions():
  config = ml_collections.ConfigDict(dict(kind="vae", latent_dim=4, widths=(8,),
                                          blocks_per_stage=1, beta=1.0, noise_std=0.0))
  mods = (modalities.Modality("v", "vector", (6,)),)
  models = autoencoders.build_models(config, mods)
  params = autoencoders.init_params(models, mods, jax.random.PRNGKey(0))
  x = np.random.default_rng(0).uniform(size=(300, 6)).astype(np.float32)
  samples, kl = autoencoders.posterior_latents(models, params, {"v": x}, ["v"],
                                               jax.random.PRNGKey(1), batch_size=128)
  mean, logvar = autoencoders.posterior_fn(models)(params, {"v": jnp.asarray(x)})["v"]
  z = (samples["v"] - np.asarray(mean)) / np.exp(0.5 * np.asarray(logvar))
  # The standardised noise is N(0, 1), independent of the posterior mean.
  assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
  expected = np.mean(0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar), 0)
  np.testing.assert_allclose(kl["v"], expected, rtol=1e-4, atol=1e-6)


def _vector_setup(grad_clip):
  config = ml_collections.ConfigDict(dict(kind="vae", latent_dim=3, widths=(8,),
                                          blocks_per_stage=1, decoder_head="upsample",
                                          beta=0.5, noise_std=0.0, grad_clip=grad_clip))
  mods = (modalities.Modality("a", "vector", (5,)), modalities.Modality("b", "vector", (7,)))
  models = autoencoders.build_models(config, mods)
  params = autoencoders.init_params(models, mods, jax.random.PRNGKey(0))
  rs = np.random.RandomState(0)
  batches = [{m.name: rs.uniform(size=(4,) + m.shape).astype(np.float32) for m in mods}
             for _ in range(4)]
  return config, mods, models, params, batches


def test_one_optimiser_per_modality_equals_one_joint_optimiser():
  """With every modality training the same steps, the per-modality optimisers
  (each its own schedule, gradients clipped by their joint norm) give the bits
  of one optimiser over all of them, clipping included (a clip of 0.05 acts
  at every step here)."""
  config, mods, models, params, batches = _vector_setup(grad_clip=0.05)
  joint_tx = training.make_optimizer(1e-2, 4, warmup_steps=1, grad_clip=0.05)
  joint = training.make_train_step(autoencoders.get_loss_fn(models, mods, config), joint_tx)
  grads = jax.grad(lambda p: autoencoders.get_loss_fn(models, mods, config)(
      p, jax.random.PRNGKey(0), batches[0])[0])(params)
  assert float(optax.tree.norm(grads)) > 0.05  # the clip acts
  copy = lambda: jax.tree.map(jnp.copy, params)  # each state's own buffers: steps donate
  state = training.TrainState.create(copy(), joint_tx)
  txs = {m.name: training.make_optimizer(1e-2, 4, warmup_steps=1) for m in mods}
  step = autoencoders.make_train_step(models, mods, config, txs)
  ours = autoencoders.new_state(copy(), txs)
  for i, batch in enumerate(batches):
    rng = jax.random.PRNGKey(i)
    state, _ = joint(state, batch, rng)
    ours, metrics = step(ours, batch, rng)
    assert metrics["loss"] == pytest.approx(float(metrics["a/loss"] + metrics["b/loss"]))
  jax.tree.map(np.testing.assert_array_equal, state.params, ours.params)


def test_a_modality_stops_at_its_own_step_count(tmp_path):
  """`autoencoder.modality_steps`: "a" trains 2 of the stage's 4 steps with its
  schedule over 2 steps, bit for bit as in a 2-step stage; "b" trains all 4."""
  config, mods, models, params, batches = _vector_setup(grad_clip=1.0)
  full = ml_collections.ConfigDict(dict(autoencoder=config))
  full.autoencoder.update(num_steps=4, learning_rate=1e-2, warmup_steps=1,
                          modality_steps={"a": 2})
  steps = autoencoders.modality_steps(full, mods)
  assert steps == {"a": 2, "b": 4}
  capped = ml_collections.ConfigDict(full.to_dict())
  capped.autoencoder.num_steps = 1  # a count above num_steps does not bind
  assert autoencoders.modality_steps(capped, mods) == {"a": 1, "b": 1}
  assert [sorted(autoencoders.batch_fn(batches, steps)(s)) for s in range(4)] == [
      ["a", "b"], ["a", "b"], ["b"], ["b"]]

  def train(cfg, num_steps):
    txs = autoencoders.optimizers(cfg, mods)
    return training.run("ae", autoencoders.new_state(params, txs),
                        autoencoders.make_train_step(models, mods, cfg.autoencoder, txs),
                        autoencoders.batch_fn(batches, autoencoders.modality_steps(cfg, mods)),
                        num_steps=num_steps, rng=jax.random.PRNGKey(3), manager=None,
                        log_every=1)

  short = ml_collections.ConfigDict(full.to_dict())
  short.autoencoder.update(num_steps=2, modality_steps={})
  two, four = train(short, 2), train(full, 4)
  jax.tree.map(np.testing.assert_array_equal, two.params["a"], four.params["a"])
  counts = {n: {int(x) for x in jax.tree.leaves(four.opt_state[n]) if np.ndim(x) == 0}
            for n in ("a", "b")}
  assert counts == {"a": {2}, "b": {4}}  # Adam's and the schedule's step counts
  moved = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), two.params["b"],
                       four.params["b"])
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize("overrides,match", [
    ({"m9": 2}, r"config\.autoencoder\.modality_steps\.m9: 'm9' is not a modality"),
    ({"m1": 0}, r"config\.autoencoder\.modality_steps\.m1=0: must be a positive integer"),
    ({"m1": 2.5}, r"config\.autoencoder\.modality_steps\.m1=2\.5: must be a positive"),
])
def test_bad_modality_steps_are_named_before_anything_is_written(tmp_path, tiny_config,
                                                                 overrides, match):
  config = tiny_config()
  config.autoencoder.modality_steps = overrides
  with pytest.raises(errors.ConfigError, match=match):
    pipeline.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
