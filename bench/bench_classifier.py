"""Throughput of the digit-classifier train step (stage `classifier`).

The 5 PolyMNIST classifiers (DigitClassifier, width 32) trained together in
one jitted step, as sbmae/stages/classifier.py does (random shifts, dropout,
cross-entropy, grads, Adam): images/s and the share of the machine's XLA
matmul peak (measured at start; FLOPs from XLA's cost analysis).

  JAX_PLATFORMS=cpu python bench/bench_classifier.py [--batch_sizes=128,256] [--profile]
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import common
from sbmae.stages import classifier
from sbmae import training
from sbmae.models import classifier as classifier_model

flags.DEFINE_list("batch_sizes", ["128", "256"], "Batch sizes to time.")
flags.DEFINE_integer("num_modalities", 5, "Classifiers trained in one step.")
flags.DEFINE_integer("width", 32, "DigitClassifier width.")
flags.DEFINE_integer("iters", 5, "Timed steps.")
flags.DEFINE_bool("profile", False, "Also print where each step's XLA op time goes.")
FLAGS = flags.FLAGS


def bench(batch_size, peak):
  """Times one train step of all classifiers at `batch_size`; prints the figures."""
  model = classifier_model.DigitClassifier(width=FLAGS.width)
  names = [f"m{k}" for k in range(FLAGS.num_modalities)]
  tx = training.make_optimizer(2e-3, 1000, warmup_steps=100)
  state = training.TrainState.create(
      classifier.init_params(model, jax.random.PRNGKey(0), names), tx)
  step = classifier.make_train_step(model, tx)
  batch = {n: jax.random.uniform(jax.random.PRNGKey(k), (batch_size, 28, 28, 3))
           for k, n in enumerate(names)}
  batch["label"] = jnp.arange(batch_size) % 10
  common.time_train_step(
      f"classifier train step, {len(names)} modalities, batch {batch_size}", step, state,
      batch, batch_size * len(names), "images", peak, FLAGS.iters, profile=FLAGS.profile)


def main(_):
  peak = common.print_peak()
  for batch_size in FLAGS.batch_sizes:
    bench(int(batch_size), peak)


if __name__ == "__main__":
  app.run(main)
