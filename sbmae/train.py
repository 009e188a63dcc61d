"""`train_and_evaluate(config, workdir)`: the pipeline's stages in order.

Stages (each resumable from its checkpoint, skipped when finished):
  classifier   -> digit classifiers for coherence (PolyMNIST only)
  autoencoders -> one autoencoder per modality + whitened latents
  reduce       -> score-ratio dimension reduction (when config.reduction.enabled)
  prior        -> joint score model over the (reduced) latents
  evaluate     -> coherence, Frechet distances, sample grids
"""

import json
import os
import pathlib
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from sbmae import autoencoders
from sbmae import classifier
from sbmae import evaluate
from sbmae import evaluate_celeba
from sbmae import images
from sbmae import metrics
from sbmae import modalities
from sbmae import multimodal
from sbmae import prior
from sbmae import reduction
from sbmae.data import celeba
from sbmae.data import pipeline
from sbmae.data import polymnist

STAGES = ("classifier", "autoencoders", "reduce", "prior", "evaluate")
REDUCTION_DIR = "reduce"


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


def config_from_json(text):
  """Inverse of `ConfigDict.to_json()` (lists come back as tuples)."""
  def fix(value):
    if isinstance(value, dict):
      return {k: fix(v) for k, v in value.items()}
    return tuple(value) if isinstance(value, list) else value
  return ml_collections.ConfigDict(fix(json.loads(text)))


def _polymnist(config, workdir):
  """PolyMNIST splits (built once, cached) as dicts of arrays."""
  cache = config.data.cache_dir or os.path.join(workdir, "data")
  splits = polymnist.load(config.data, cache, config.seed)
  splits = {"train": splits["train"].take(config.data.num_train),
            "test": splits["test"].take(config.data.num_test)}
  example_grid = pathlib.Path(workdir) / "data_examples.png"
  if jax.process_index() == 0 and not example_grid.exists():
    images.save_png(example_grid, images.grid(splits["train"].images[:8]), scale=2)
  return {s: pipeline.modality_arrays(splits[s]) for s in splits}


def _celeba(config, workdir):
  """CelebAMask-HQ splits (read once from `config.data.path`, cached) as dicts of arrays.

  The reader gives the binary modalities (mask, attrs) as uint8 {0, 1}; they are
  scaled to uint8 {0, 255} here, so that every modality is uint8 and the
  pipeline's uint8 -> [0, 1] scaling (and the evaluator's division by 255) maps
  them to exactly {0, 1}. The image number ("index") is not a modality and is
  dropped. `data.num_train` / `data.num_test` keep the first n of each split.
  """
  c = config.data
  cache = c.cache_dir or os.path.join(workdir, "data")
  if not c.path and not celeba.cache_path(cache, c.image_size).exists():
    raise ValueError(f"config.data.path is empty and there is no cache in {cache}. "
                     f"{celeba.HOW_TO_GET}")
  splits = celeba.load_celeba(c.path, c.image_size, cache, num_test=c.test_split_size)
  arrays = {}
  for split, num in (("train", c.num_train), ("test", c.num_test)):
    keep = slice(None) if num < 0 else slice(num)
    arrays[split] = {n: splits[split][n][keep] for n in celeba.MODALITIES}
    for n in ("mask", "attrs"):
      arrays[split][n] = arrays[split][n] * np.uint8(255)
  example_grid = pathlib.Path(workdir) / "data_examples.png"
  if jax.process_index() == 0 and not example_grid.exists():
    evaluate_celeba.save_examples(example_grid, arrays["train"], num=8)
  return arrays


# name -> (loader(config, workdir) -> {"train": arrays, "test": arrays},
#          modalities(config) -> tuple of Modality, evaluator, needs_classifier)
DATASETS = {
    "polymnist": (_polymnist, lambda c: modalities.polymnist(c.data.num_modalities),
                  evaluate.run, True),
    "celeba": (_celeba, lambda c: modalities.celeba(c.data.image_size),
               evaluate_celeba.run, False),
}


def _dataset(config):
  if config.data.name not in DATASETS:
    raise ValueError(f"config.data.name={config.data.name!r}: expected one of "
                     f"{sorted(DATASETS)}")
  return DATASETS[config.data.name]


def load_data(config, workdir):
  """Splits of the data set named by `config.data.name`, cached under the workdir.

  Returns:
    ({"train": arrays, "test": arrays}, modalities); arrays = dict name -> array.
  """
  loader, mods, _, _ = _dataset(config)
  return loader(config, workdir), mods(config)


def _stages(config):
  if not config.stage:
    return STAGES
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}: expected one of {STAGES}")
  return (config.stage,)


def _fit_reduction(config, workdir, latents, names):
  """Fits (or loads) the reduction and writes its plots."""
  path = pathlib.Path(workdir) / REDUCTION_DIR
  if (path / reduction.SUMMARY_FILE).exists():
    return reduction.Reduction.restore(path)
  t0 = time.perf_counter()
  red = reduction.fit({n: latents[n] for n in names}, epsilon=config.reduction.epsilon,
                      rng=jax.random.PRNGKey(config.seed + 2), config=config.reduction)
  logging.info("[reduce] ranks %s, KL bound %.4f, %.1f s", red.ranks, red.kl_bound,
               time.perf_counter() - t0)
  if jax.process_index() == 0:
    from sbmae import plots  # pylint: disable=g-import-not-at-top  (matplotlib is slow to import)
    plots.save_all(red, path)
    red.save(path)
  return red


def build_multimodal(config, workdir):
  """The trained MultimodalModel of `workdir` (all stages must be finished)."""
  mods = _dataset(config)[1](config)
  names = [m.name for m in mods]
  models, ae_params = autoencoders.restore(config, workdir, mods)
  stats = autoencoders.LatentStats.load(pathlib.Path(workdir) / autoencoders.STAGE /
                                        "latent_stats.npz")
  red = (reduction.Reduction.restore(pathlib.Path(workdir) / REDUCTION_DIR)
         if config.reduction.enabled else None)
  dims = ([red.ranks[n] for n in names] if red is not None
          else [config.autoencoder.latent_dim] * len(names))
  prior.check_sampling_config(config)
  sde, _, score_fn, params = prior.restore(config, workdir, dims)
  return multimodal.MultimodalModel(mods, models, ae_params, stats, red, sde, score_fn,
                                    params, config.sampling)


def train_and_evaluate(config, workdir):
  """Runs the configured stages; re-running resumes and skips finished ones."""
  stages = _stages(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json(indent=1))
  writer = metrics.Writer(workdir)
  data, mods = load_data(config, workdir)
  names = [m.name for m in mods]
  logging.info("Data: %d train / %d test tuples of %d modalities",
               len(data["train"][names[0]]), len(data["test"][names[0]]), len(mods))
  timings = {}

  def timed(name, fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    timings[name] = time.perf_counter() - t0
    logging.info("[%s] stage time %.1f s", name, timings[name])
    return result

  _, _, evaluator, needs_classifier = _dataset(config)
  if "classifier" in stages and needs_classifier:
    timed("classifier", classifier.train, config, workdir, data, writer)
  if "autoencoders" in stages:
    timed("autoencoders", autoencoders.train, config, workdir, data, mods, writer)
  if {"reduce", "prior"} & set(stages):
    latents, test_latents = (autoencoders.load_latents(workdir)[s] for s in ("train", "test"))
  if "reduce" in stages and config.reduction.enabled:
    timed("reduce", _fit_reduction, config, workdir, latents, names)
  if "prior" in stages:
    if config.reduction.enabled:
      red = reduction.Reduction.restore(workdir / REDUCTION_DIR)
      latents, test_latents = red.project(latents), red.project(test_latents)
    timed("prior", prior.train, config, workdir, latents, names, writer, test_latents)
  if "evaluate" in stages:
    mm = build_multimodal(config, workdir)
    timed("evaluate", evaluator, config, workdir, mm, data["test"], writer)
  times_path = workdir / "stage_times.json"
  if times_path.exists():  # keep the times of stages this invocation did not run
    timings = {**json.loads(times_path.read_text()), **timings}
  writer.json("stage_times.json", timings)
  writer.close()
