"""Throughput of the autoencoder train step (SBM-AE PolyMNIST architecture).

One modality's residual autoencoder (widths 64-128-256, latent 64, 28x28x3
padded to 32x32), full train step (loss, grads, Adam update) at batch 256 and
32, and the 5-modality step of the pipeline at batch 256; examples/s and the
share of the machine's fp32 matmul peak (FLOPs from XLA's cost analysis).
`--widths=16,32,64 --cases=5x64` times the `cpu` config's conv widths and batch
(as an RAE; its VAE adds one Gaussian sample per latent); `--decoder_head=subpixel`
the decoder without a full-resolution hidden layer (`autoencoder.decoder_head`).

Reference, PyTorch SBM-AE on the same 2-core CPU: batch 256 2.16 s
(118 images/s, ~40% of peak); batch 32 0.21 s.

  JAX_PLATFORMS=cpu python bench/bench_autoencoder.py [--profile]

`--profile` also prints where each step's time goes (convolutions, elementwise
fusions, layout copies, reductions, and the largest groups of ops, convolutions
by shape: `common.op_breakdown`).
"""

from absl import app
from absl import flags
import jax
import ml_collections

import common
from sbmae.stages import autoencoders
from sbmae.data import modalities
from sbmae import training

flags.DEFINE_integer("iters", 5, "Timed steps.")
flags.DEFINE_list("cases", ["1x256", "1x32", "5x256"], "modalities x batch size.")
flags.DEFINE_list("widths", ["64", "128", "256"], "Conv widths (the cpu config's: 16,32,64).")
flags.DEFINE_enum("decoder_head", "upsample", ["upsample", "subpixel"],
                  "The conv decoder's last layers (autoencoder.decoder_head).")
flags.DEFINE_bool("profile", False, "Also print where each step's XLA op time goes.")
FLAGS = flags.FLAGS


def bench(num_modalities, batch_size, peak):
  config = ml_collections.ConfigDict(dict(
      kind="rae", latent_dim=64, widths=tuple(map(int, FLAGS.widths)), blocks_per_stage=1,
      decoder_head=FLAGS.decoder_head, beta=0.01, noise_std=0.01, grad_clip=1.0))
  mods = modalities.polymnist(num_modalities)
  models = autoencoders.build_models(config, mods)
  txs = {m.name: training.make_optimizer(1e-3, 1000) for m in mods}
  state = autoencoders.new_state(
      autoencoders.init_params(models, mods, jax.random.PRNGKey(0)), txs)
  step = autoencoders.make_train_step(models, mods, config, txs)

  batch = {m.name: jax.random.uniform(jax.random.PRNGKey(k), (batch_size, 28, 28, 3))
           for k, m in enumerate(mods)}
  name = (f"autoencoder {'-'.join(FLAGS.widths)} ({FLAGS.decoder_head} head) train step, "
          f"{num_modalities} modality(ies), batch {batch_size}")
  common.time_train_step(name, step, state, batch, batch_size * num_modalities, "images",
                         peak, FLAGS.iters, profile=FLAGS.profile)


def main(_):
  peak = common.print_peak()
  for case in FLAGS.cases:
    num_modalities, batch_size = map(int, case.split("x"))
    bench(num_modalities, batch_size, peak)


if __name__ == "__main__":
  app.run(main)
