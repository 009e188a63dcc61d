"""The layout of a run folder: every path the pipeline reads or writes, in one place.

  W/config.json                  the resolved config (`save_config`, `load_config`)
  W/stage_times.json             seconds per stage
  W/tb/                          TensorBoard events
  W/data/                        data cache (unless config.data.cache_dir is set)
  W/data_examples.png            a few training tuples
  W/classifier/                  checkpoints/, test_accuracy.json
  W/autoencoders/                checkpoints/, latents.npz (whitened), latent_stats.npz,
                                 test_reconstruction.json, reconstructions.png,
                                 latent_usage.json (VAE)
  W/reduce/                      reduction.json, arrays/, spectra.png, kl_bound.png,
                                 ranks.png, rank_sweep.{json,png}
  W/prior/                       checkpoints/, eval_metrics.json
  W/eval/                        metrics.json, pictures of samples

Code never spells these names itself: it asks a `RunDir` for them.
"""

import json
import pathlib

import ml_collections

from sbmae import errors
from sbmae import faults

# Stage name -> its folder (the evaluate stage writes to "eval").
STAGE_DIRS = {"classifier": "classifier", "autoencoders": "autoencoders",
              "reduce": "reduce", "prior": "prior", "evaluate": "eval"}


def config_from_json(text):
  """Inverse of `ConfigDict.to_json()` (lists come back as tuples)."""
  def fix(value):
    if isinstance(value, dict):
      return {k: fix(v) for k, v in value.items()}
    return tuple(value) if isinstance(value, list) else value
  return ml_collections.ConfigDict(fix(json.loads(text)))


def _in_root(name, doc):
  return property(lambda self: self.root / name, doc=doc)


def _in_stage(stage, name, doc):
  return property(lambda self: self.stage(stage) / name, doc=doc)


class RunDir:
  """Paths of one run folder (nothing is created until a writer needs it)."""

  def __init__(self, root):
    self.root = pathlib.Path(root)

  def __repr__(self):
    return f"RunDir({str(self.root)!r})"

  config = _in_root("config.json", "The resolved config (`save_config`).")
  stage_times = _in_root("stage_times.json", "Seconds per stage.")
  tensorboard = _in_root("tb", "TensorBoard event folder.")
  data_examples = _in_root("data_examples.png", "A few training tuples.")
  classifier_accuracy = _in_stage("classifier", "test_accuracy.json",
                                  "Test accuracy per modality.")
  latents = _in_stage("autoencoders", "latents.npz", "Whitened latents of both splits.")
  latent_stats = _in_stage("autoencoders", "latent_stats.npz", "The `latents.Whitening`.")
  test_reconstruction = _in_stage("autoencoders", "test_reconstruction.json",
                                  "Test MSE per modality.")
  latent_usage = _in_stage("autoencoders", "latent_usage.json",
                           "A VAE's posterior KL per latent dimension and the used count.")
  reconstructions = _in_stage("autoencoders", "reconstructions.png",
                              "Inputs, then their reconstructions.")
  prior_eval = _in_stage("prior", "eval_metrics.json",
                         "Held-out denoising losses per k during prior training.")
  rank_sweep = _in_stage("reduce", "rank_sweep",
                         "Stem of the rank sweep's .json and .png (`sbmae.tools.rank_sweep`).")
  eval_metrics = _in_stage("evaluate", "metrics.json", "Evaluation metrics.")

  def data_cache(self, cache_dir=""):
    """`cache_dir` when given (shared between runs), else W/data."""
    return pathlib.Path(cache_dir) if cache_dir else self.root / "data"

  def stage(self, name):
    """The folder of stage `name` (a key of STAGE_DIRS)."""
    return self.root / STAGE_DIRS[name]

  def checkpoints(self, name):
    """The Orbax checkpoint folder of a trained stage (absolute, as Orbax wants)."""
    return self.stage(name).absolute() / "checkpoints"

  @property
  def reduction(self):
    """Folder of the fitted reduction (`Reduction.save` / `restore`) and its plots."""
    return self.stage("reduce")

  def eval_picture(self, label):
    """A picture of the evaluation, named by its label."""
    return self.stage("evaluate") / f"{label}.png"

  def save_config(self, config):
    """Writes the resolved config as JSON (atomically)."""
    faults.write_text(self.config, config.to_json(indent=1))

  def load_config(self):
    """The config a run saved (`save_config`)."""
    if not self.config.exists():
      raise errors.StageOrderError(f"{self.config} not found: {self.root} is not a run folder "
                              "(run python -m sbmae.main --config=... --workdir=... first)")
    return config_from_json(self.config.read_text())
