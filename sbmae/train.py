"""`train_and_evaluate(config, workdir)`: the pipeline's stages in order.

Stages (each resumable from its Orbax checkpoint, skipped when finished):
  classifier   -> digit classifiers for coherence (PolyMNIST only)
  autoencoders -> one autoencoder per modality + latent whitening statistics
  reduce       -> score-ratio dimension reduction (when config.reduction.enabled)
  prior        -> joint score model over the (reduced) latents
  evaluate     -> coherence, Frechet distances, sample grids
"""

import os
import pathlib

from absl import logging
import jax


from sbmae import autoencoders
from sbmae import classifier
from sbmae import images
from sbmae import metrics
from sbmae import modalities
from sbmae.data import pipeline
from sbmae.data import polymnist

STAGES = ("classifier", "autoencoders")


def maybe_initialize_distributed():
  """Calls `jax.distributed.initialize()` when the environment asks for it.

  Multi-process runs are recognised by an explicit coordinator
  (SBMAE_COORDINATOR=host:port with SBMAE_NUM_PROCESSES and SBMAE_PROCESS_ID),
  a SLURM job step with more than one task, or a TPU pod slice (TPU_WORKER_HOSTNAMES
  listing several hosts); jax picks the details up from the environment.
  """
  env = os.environ
  if "SBMAE_COORDINATOR" in env:
    jax.distributed.initialize(coordinator_address=env["SBMAE_COORDINATOR"],
                               num_processes=int(env["SBMAE_NUM_PROCESSES"]),
                               process_id=int(env["SBMAE_PROCESS_ID"]))
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()


def load_data(config, workdir):
  """The data set named by `config.data.name`, cached under the workdir."""
  cache = config.data.cache_dir or os.path.join(workdir, "data")
  if config.data.name != "polymnist":
    raise ValueError(f"config.data.name={config.data.name!r}: expected 'polymnist'")
  splits = polymnist.load(config.data, cache, config.seed)
  return {"train": splits["train"].take(config.data.num_train),
          "test": splits["test"].take(config.data.num_test)}


def save_examples(splits, workdir, num=8):
  """PNG grid of the first `num` train tuples (one row per tuple)."""
  path = pathlib.Path(workdir) / "data_examples.png"
  if jax.process_index() == 0 and not path.exists():
    images.save_png(path, images.grid(splits["train"].images[:num]), scale=2)


def _stages(config):
  if not config.stage:
    return STAGES
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}: expected one of {STAGES}")
  return (config.stage,)


def train_and_evaluate(config, workdir):
  """Runs the configured stages; re-running resumes and skips finished ones."""
  stages = _stages(config)
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  writer = metrics.Writer(workdir)
  splits = load_data(config, workdir)
  logging.info("Data: %d train / %d test tuples of %d modalities",
               len(splits["train"].labels), len(splits["test"].labels),
               splits["train"].num_modalities)
  save_examples(splits, workdir)
  if "classifier" in stages:
    classifier.train(config, workdir, splits, writer)
  mods = modalities.polymnist(config.data.num_modalities)
  data = {s: pipeline.modality_arrays(splits[s]) for s in splits}
  if "autoencoders" in stages:
    autoencoders.train(config, workdir, data, mods, writer)
  writer.close()

