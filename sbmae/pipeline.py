"""`train_and_evaluate(config, workdir)`: the pipeline's stages in order.

  data          -> splits of the configured data set (`sbmae.data.registry`)
  classifier    -> digit classifiers for coherence (PolyMNIST only)
  autoencoders  -> one autoencoder per modality + whitened latents
  reduce        -> score-ratio dimension reduction (when config.reduction.enabled)
  prior         -> joint score model over the (reduced) latents
  evaluate      -> coherence / F1s, Frechet distances, pictures (`sbmae.eval.driver`)

Each stage resumes from its checkpoint and is skipped when finished; this
module only orders them, times them and says what a single stage needs.
Before any work it checks the whole config (`errors.validate_config`), that
the workdir was made with the same config (`errors.check_same_run`) and that a
stage run alone (`--config.stage`) finds the stages it needs
(`errors.StageOrderError`).
"""

import json
import time

from absl import logging
import jax

from sbmae import errors
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
  if config.stage == "reduce" and not config.reduction.enabled:
    raise errors.ConfigError("config.stage='reduce' with config.reduction.enabled=False "
                             "has nothing to do; add --config.reduction.enabled=True")
  return (config.stage,)


def _finished_step(directory):
  """The latest committed Orbax step in `directory` (temporary folders ignored), or -1."""
  if not directory.is_dir():
    return -1
  return max((int(p.name) for p in directory.iterdir() if p.name.isdigit()), default=-1)


def _finished(config, run):
  """Stage -> (the output later stages read, whether it is complete)."""
  summary = reduce.summary(run)
  prior_dir = run.checkpoints("prior")
  return {
      "classifier": (run.classifier_accuracy, run.classifier_accuracy.exists()),
      "autoencoders": (run.latents, run.latents.exists() and run.latent_stats.exists()),
      "reduce": (summary, summary.exists()),
      "prior": (prior_dir, _finished_step(prior_dir) >= config.prior.num_steps),
  }


def check_inputs(config, run, todo):
  """Raises StageOrderError when a stage in `todo` needs one that is neither done nor to run."""
  reduced = ["reduce"] if config.reduction.enabled else []
  clf = ["classifier"] if registry.get(config.data).needs_classifier else []
  needs = {"classifier": [], "autoencoders": [], "reduce": ["autoencoders"],
           "prior": ["autoencoders", *reduced],
           "evaluate": [*clf, "autoencoders", *reduced, "prior"]}
  finished = _finished(config, run)
  for stage in todo:
    for need in needs[stage]:
      if need not in todo and not finished[need][1]:
        raise errors.StageOrderError(
            f"stage {stage} needs the {need} stage: run it first (or drop "
            f"--config.stage); {finished[need][0]} is missing or unfinished in {run.root}")


def _check_workdir(config, run):
  """Refuses a workdir made with another config (see `errors.check_same_run`)."""
  if not run.config.exists():
    return
  started = [s for s in stages.STAGES[:-1] if run.stage(s).exists()]
  diff = errors.check_same_run(run.load_config(), config, started, run.config)
  if diff:
    logging.warning("Continuing %s with a changed config (allow_config_change): %s",
                    run.root, "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff))


def train_and_evaluate(config, workdir):
  """Runs the configured stages; re-running resumes and skips finished ones.

  Raises:
    errors.ConfigError: a config value out of range, or the workdir holds a
      run of another config (`errors.RunMismatchError`).
    errors.StageOrderError: `config.stage` names a stage whose inputs are missing.
    errors.DataError: the data cannot be read.
  """
  errors.validate_config(config, stages.STAGES)
  # The data set's name and per-modality settings, before anything is written.
  autoencoders.check_modality_steps(
      config, registry.get(config.data).modalities(config.data))
  todo = _stages(config)
  run = rundir.RunDir(workdir)
  _check_workdir(config, run)
  check_inputs(config, run, todo)
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
