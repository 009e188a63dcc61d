"""Reconstruction ceiling of autoencoder settings, without running the rest.

  python -m sbmae.tools.ae_ceiling --config=configs/polymnist.py:cpu --workdir=W \
      --modalities=m0,m4 --num_examples=2000 --config.autoencoder.latent_dim=128

For a run folder W whose classifier stage is finished (its data and
classifiers are used; nothing in W is changed), trains the autoencoders of the
named modalities from scratch with the config's `autoencoder` section (the
autoencoders stage's loss, optimiser, data order and seeds; no checkpoints) and
reports the classifier's accuracy on decode(encode(x)) of the first
`num_examples` test tuples (the reconstruction coherence, the ceiling on
conditional coherence) with the test MSE per pixel and the training time.
Prints one JSON line and, with --out, writes it there.

Modalities trained alone differ from the same modalities trained with the
others in one way: gradient clipping (`autoencoder.grad_clip`) acts on the
global norm of the parameters trained together.
"""

import json
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from sbmae import errors
from sbmae import pipeline
from sbmae import rundir
from sbmae import stages
from sbmae import training
from sbmae.data import input_pipeline
from sbmae.eval import polymnist
from sbmae.stages import autoencoders
from sbmae.stages import classifier as classifier_lib


def measure(config, workdir, names=None, num_examples=2000):
  """Trains the named modalities' autoencoders alone; returns their ceiling.

  Args:
    config: full config (its `autoencoder` section is what is measured).
    workdir: run folder with a finished classifier stage.
    names: modality names to train (None: all).
    num_examples: first test tuples scored.

  Returns:
    {"reconstruction_{m}": accuracy, "test_mse_{m}": MSE per pixel,
     "train_s": seconds, "num_examples": n} for each trained m.
  """
  run = rundir.RunDir(workdir)
  data, mods = pipeline.load_data(config, run)
  all_names = [m.name for m in mods]
  names = all_names if names is None else list(names)
  unknown = sorted(set(names) - set(all_names))
  if unknown:
    raise errors.ConfigError(f"--modalities: {unknown} not in this data set's {all_names}")
  clf_model, clf_params = classifier_lib.restore(config, run, all_names)
  mods = tuple(m for m in mods if m.name in names)
  c = config.autoencoder
  models, txs, state = autoencoders.init_state(config, mods)
  keep = names + ["label"]
  ds = input_pipeline.dataset({k: data["train"][k] for k in keep},
                              training.per_process_batch(c.batch_size),
                              seed=stages.stage_seed(config, autoencoders.STAGE))
  step = autoencoders.make_train_step(models, mods, c, txs)
  start = time.perf_counter()
  state = training.run("ae_ceiling", state, step,
                       autoencoders.batch_fn(ds, autoencoders.modality_steps(config, mods)),
                       num_steps=c.num_steps,
                       rng=stages.stage_rng(config, autoencoders.STAGE), manager=None,
                       log_every=config.log_every)
  jax.block_until_ready(state.params)
  train_s = time.perf_counter() - start

  test = {k: data["test"][k][:num_examples] for k in keep}
  encode, decode = autoencoders.encode_fn(models), autoencoders.decode_fn(models)
  mse = autoencoders.reconstruction_mse(encode, decode, state.params, test, mods)
  logits, hits = classifier_lib.logits_fn(clf_model), []
  for batch in input_pipeline.eval_batches(test, 500):
    x = {n: batch[n] for n in names}
    recon = jax.device_get(decode(state.params, encode(state.params, x)))  # off the mesh.
    acc = polymnist.label_accuracy(logits, clf_params, recon, np.asarray(batch["label"]))
    hits.append((len(batch["label"]), acc))
  total = sum(k for k, _ in hits)
  result = {f"reconstruction_{n}": sum(k * a[n] for k, a in hits) / total for n in names}
  result.update({f"test_mse_{n}": mse[n] for n in names})
  result.update(train_s=train_s, num_examples=len(test["label"]))
  return result


def _define_flags():
  """Command-line flags, defined only when run as a program (tests import `measure`)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run folder with a finished classifier stage.")
  flags.DEFINE_list("modalities", None, "Modalities to train (default: all).")
  flags.DEFINE_integer("num_examples", 2000, "Test tuples scored.")
  flags.DEFINE_string("out", None, "Also write the JSON result to this file.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  line = json.dumps(measure(f.config, f.workdir, f.modalities, f.num_examples))
  print(line)
  if f.out:
    with open(f.out, "w") as out:
      out.write(line + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
