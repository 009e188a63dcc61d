"""`train_and_evaluate(config, workdir)`: the pipeline's stages in order.

  data          -> splits of the configured data set (`sbmae.data.registry`)
  classifier    -> digit classifiers for coherence (PolyMNIST only)
  autoencoders  -> one autoencoder per modality + whitened latents
  reduce        -> score-ratio dimension reduction (when config.reduction.enabled)
  prior         -> joint score model over the (reduced) latents
  evaluate      -> coherence / F1s, Frechet distances, pictures (`sbmae.eval.driver`)

Each stage resumes from its checkpoint and is skipped when finished; this
module only orders them, times them and says what a single stage needs.
"""

import json
import time

from absl import logging
import jax

from sbmae import metrics
from sbmae import rundir
from sbmae import stages
from sbmae import system
from sbmae.data import registry
from sbmae.eval import driver
from sbmae.stages import autoencoders
from sbmae.stages import classifier
from sbmae.stages import prior
from sbmae.stages import reduce


def load_data(config, run):
  """Splits and modalities of the data set named by `config.data.name`.

  Args:
    config: full config.
    run: the `RunDir` (its data cache unless `config.data.cache_dir` is set).

  Returns:
    ({"train": arrays, "test": arrays}, modalities); arrays = dict name -> array.
  """
  dataset = registry.get(config.data)
  data = dataset.load(config.data, run.data_cache(config.data.cache_dir), config.seed)
  mods = dataset.modalities(config.data)
  if jax.process_index() == 0 and not run.data_examples.exists():
    driver.save_examples(config, run.data_examples, data["train"], [m.name for m in mods])
  return data, mods


def _stages(config):
  if not config.stage:
    return stages.STAGES
  if config.stage not in stages.STAGES:
    raise ValueError(f"config.stage={config.stage!r}: expected one of {stages.STAGES}")
  return (config.stage,)


def train_and_evaluate(config, workdir):
  """Runs the configured stages; re-running resumes and skips finished ones."""
  todo = _stages(config)
  run = rundir.RunDir(workdir)
  if jax.process_index() == 0:
    run.save_config(config)
  writer = metrics.Writer(run.tensorboard)
  data, mods = load_data(config, run)
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

  if "classifier" in todo and registry.get(config.data).needs_classifier:
    timed("classifier", classifier.train, config, run, data, writer)
  if "autoencoders" in todo:
    timed("autoencoders", autoencoders.train, config, run, data, mods, writer)
  if {"reduce", "prior"} & set(todo):
    latents = autoencoders.load_latents(run)
  if "reduce" in todo and config.reduction.enabled:
    timed("reduce", reduce.train, config, run, latents["train"], names)
  if "prior" in todo:
    if config.reduction.enabled:
      red = reduce.restore(run)
      latents = {s: red.project(v) for s, v in latents.items()}
    timed("prior", prior.train, config, run, latents["train"], names, writer, latents["test"])
  if "evaluate" in todo:
    mm = system.build(config, run)
    timed("evaluate", driver.run, config, run, mm, data["test"], writer)
  if run.stage_times.exists():  # keep the times of stages this invocation did not run
    timings = {**json.loads(run.stage_times.read_text()), **timings}
  writer.json(run.stage_times, timings)
  writer.close()
