"""Input-pipeline throughput: PolyMNIST batches (examples/s) from the grain pipeline.

  python bench/bench_input.py [--num_modalities=5] [--batch_size=256] [--steps=200]

Builds PolyMNIST-M from real MNIST (--mnist, default ../shared/data/mnist.npz;
test split, 10,000 tuples) and times shuffled batches as the training loop
reads them: index shuffle, gather, uint8 -> float32 [0, 1].
"""

import time

from absl import app
from absl import flags
import numpy as np

from sbmae.data import mnist
from sbmae.data import input_pipeline
from sbmae.data import polymnist

flags.DEFINE_string("mnist", "../shared/data/mnist.npz", "MNIST .npz or idx folder.")
flags.DEFINE_integer("num_modalities", 5, "M.")
flags.DEFINE_integer("batch_size", 256, "Batch size.")
flags.DEFINE_integer("steps", 200, "Timed batches.")
FLAGS = flags.FLAGS


def main(_):
  digits = mnist.load_mnist(FLAGS.mnist)
  t0 = time.perf_counter()
  split = polymnist.build_split(digits["x_test"], digits["y_test"],
                                polymnist.load_backgrounds("builtin", FLAGS.num_modalities),
                                seed=0)
  build_s = time.perf_counter() - t0
  print(f"build PolyMNIST-{FLAGS.num_modalities} (10,000 tuples): {build_s:.2f} s "
        f"({len(split.labels) / build_s:,.0f} tuples/s)")
  ds = input_pipeline.dataset(input_pipeline.modality_arrays(split), FLAGS.batch_size, seed=0,
                        shard_index=0, shard_count=1)
  for i in range(5):  # warm-up
    ds[i]
  t0 = time.perf_counter()
  for i in range(FLAGS.steps):
    batch = ds[i]
  elapsed = time.perf_counter() - t0
  examples = FLAGS.steps * FLAGS.batch_size
  nbytes = sum(v.nbytes for v in batch.values()) * FLAGS.steps
  print(f"pipeline M={FLAGS.num_modalities} batch={FLAGS.batch_size}: "
        f"{examples / elapsed:,.0f} examples/s ({examples * FLAGS.num_modalities / elapsed:,.0f} "
        f"images/s, {nbytes / elapsed / 2**20:,.0f} MiB/s of float32 batches)")
  assert np.isfinite(batch["m0"]).all()


if __name__ == "__main__":
  app.run(main)
