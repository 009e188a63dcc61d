"""Weak scaling of the data-parallel train step over 1, 2 and 4 devices.

  python bench/bench_scaling.py [--per_device_batch=64] [--devices=1,2,4]

On a CPU-only machine it creates 4 fake CPU devices
(--xla_force_host_platform_device_count=4) that share the same cores, so the
figures show the overhead of the sharded program (all-reduce of gradients),
not a speed-up; on a GPU/TPU host the real devices are used. Global batch =
per-device batch x devices; the step is the prior's DSM step (MLP on 5 x 64
latents) and the autoencoders' step (5 modalities, widths 16-32-64).
"""

import os

if "cpu" in os.environ.get("JAX_PLATFORMS", "cpu"):
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
import ml_collections
import numpy as np

import common
from sbmae.stages import autoencoders
from sbmae.diffusion import losses
from sbmae.data import modalities
from sbmae.stages import prior
from sbmae.diffusion import sde as sde_lib
from sbmae import training
from sbmae.models import score

flags.DEFINE_integer("per_device_batch", 64, "Batch per device.")
flags.DEFINE_list("devices", ["1", "2", "4"], "Device counts.")
flags.DEFINE_integer("iters", 5, "Timed steps.")
FLAGS = flags.FLAGS


def _prior_step():
  dims = (64,) * 5
  model = score.ScoreMLP(hidden=512, num_layers=3, time_embed_dim=128)
  sde = sde_lib.VPSDE()
  tx = training.make_optimizer(1e-3, 100)
  dsm_loss = losses.get_dsm_loss_fn(sde, model, dims)
  step = training.make_train_step(lambda p, r, b: dsm_loss(p, r, b["z"]), tx, 0.999)
  params = prior.init_params(model, jax.random.PRNGKey(0), sum(dims))
  state = training.TrainState.create(params, tx, ema=True)
  make_batch = lambda b: {"z": np.random.default_rng(0).normal(size=(b, 320)).astype(np.float32)}
  return "prior (MLP 512x3, D=320)", state, step, make_batch


def _autoencoder_step():
  config = ml_collections.ConfigDict(dict(kind="rae", latent_dim=64, widths=(16, 32, 64),
                                          blocks_per_stage=1, beta=0.01, noise_std=0.01,
                                          grad_clip=1.0))
  mods = modalities.polymnist(5)
  models = autoencoders.build_models(config, mods)
  txs = {m.name: training.make_optimizer(1e-3, 100) for m in mods}
  step = autoencoders.make_train_step(models, mods, config, txs)
  state = autoencoders.new_state(
      autoencoders.init_params(models, mods, jax.random.PRNGKey(0)), txs)
  make_batch = lambda b: {m.name: np.random.default_rng(k).uniform(size=(b, 28, 28, 3)).astype(
      np.float32) for k, m in enumerate(mods)}
  return "autoencoders (5 x 16-32-64)", state, step, make_batch


def main(_):
  print(f"devices: {jax.devices()}")
  for build in (_prior_step, _autoencoder_step):
    name, state0, step, make_batch = build()
    for n in map(int, FLAGS.devices):
      if n > jax.device_count():
        print(f"{name}: skipping {n} devices (only {jax.device_count()})")
        continue
      mesh = training.data_mesh(jax.devices()[:n])
      batch = training.shard_batch(make_batch(FLAGS.per_device_batch * n), mesh)
      holder = [training.replicate(state0, mesh)]

      def run():
        holder[0], metrics = step(holder[0], batch, jax.random.PRNGKey(0))
        return metrics["loss"]

      seconds = common.median_seconds(run, FLAGS.iters)
      examples = FLAGS.per_device_batch * n
      print(f"{name}, {n} device(s), global batch {examples}: {seconds:.3f} s/step, "
            f"{examples / seconds:,.0f} examples/s", flush=True)


if __name__ == "__main__":
  app.run(main)
