"""The project's exceptions, and the checks of what a user gives before work starts.

Every input a user controls (data files and folders, config values, the run
folder, arrays handed to the library) is checked where it enters, and a bad
one raises a subclass of `SbmaeError` whose message names the file, key,
modality or row and says what to do. `python -m sbmae.main` prints such an
error in one line and exits with status 1 (no traceback: the message is the
point); any other exception is a bug and keeps its traceback.

  SbmaeError
    DataError (ValueError)            a data file/folder/array is missing or wrong
      (sbmae.data.mnist.MnistNotFoundError, polymnist.PolyMnistError,
       celeba.CelebANotFoundError / CelebADataError join it there)
    ConfigError (ValueError)          a config value out of range, named by its key
      RunMismatchError                the workdir holds a run of another config
    StageOrderError (FileNotFoundError)  a stage started before the stage it needs
    NonFiniteError (FloatingPointError)  NaN/inf in data or latents (names the row)
      (sbmae.training.NonFiniteLossError joins it there)

Existing classes keep the built-in base they had, so `except ValueError` and
friends still catch them.
"""

import math
import numbers

import numpy as np


class SbmaeError(Exception):
  """Base of every error sbmae raises on purpose about its inputs."""


class DataError(SbmaeError, ValueError):
  """A data file, folder or array is missing, unreadable or has the wrong form."""


class ConfigError(SbmaeError, ValueError):
  """A config value is out of range; the message names the key."""


class RunMismatchError(ConfigError):
  """The workdir holds a run made with a different config."""


class StageOrderError(SbmaeError, FileNotFoundError):
  """A stage was started before the stage whose outputs it needs."""


class NonFiniteError(SbmaeError, FloatingPointError):
  """NaN or infinite values where finite ones are needed."""


def check_finite_rows(array, what):
  """Raises NonFiniteError naming the first row of `array` [N, ...] that is not finite.

  Args:
    array: numeric array whose leading axis indexes examples.
    what: how to name it, e.g. "latents of modality 'm0'".
  """
  array = np.asarray(array)
  if not np.issubdtype(array.dtype, np.inexact):
    return
  bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1) if array.ndim else (
      ~np.isfinite(array)[None])
  if bad.any():
    rows = np.flatnonzero(bad)
    raise NonFiniteError(
        f"{what}: row {rows[0]} holds NaN or inf ({len(rows)} of {len(array)} rows do); "
        "drop or fix those rows (non-finite latents mean the autoencoder diverged: "
        "retrain it with a lower learning rate)")


# ---------------------------------------------------------------------------
# Config values. Each rule is (dotted key, test, what the value must be). A key
# a config does not have is skipped, so a section that gains keys elsewhere
# needs no change here; every float anywhere must be finite.

def _int(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _num(v):
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


_POSITIVE_INT = (lambda v: _int(v) and v >= 1, "an integer >= 1")
_NONNEG_INT = (lambda v: _int(v) and v >= 0, "an integer >= 0")
_ALL_OR_COUNT = (lambda v: _int(v) and (v == -1 or v >= 1), "-1 (all) or an integer >= 1")
_POSITIVE = (lambda v: _num(v) and v > 0, "a number > 0")
_NONNEG = (lambda v: _num(v) and v >= 0, "a number >= 0")
_PROBABILITY = (lambda v: _num(v) and 0 <= v <= 1, "a probability in [0, 1]")
_OPEN_UNIT = (lambda v: _num(v) and 0 < v < 1, "a number in (0, 1)")


def _choice(*options):
  return (lambda v: v in options, f"one of {list(options)}")


_POSITIVE_INTS = (lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                  and all(_int(x) and x >= 1 for x in v), "a non-empty tuple of integers >= 1")
_NONNEG_FLOATS = (lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                  and all(_num(x) and x >= 0 for x in v), "a non-empty tuple of numbers >= 0")

RULES = (
    ("seed", lambda v: _int(v), "an integer"),
    ("log_every", *_POSITIVE_INT),
    ("checkpoint_every", *_POSITIVE_INT),
    ("data.num_modalities", lambda v: _int(v) and v >= 2, "an integer >= 2"),
    ("data.digits", *_choice("mnist", "sklearn_digits")),
    ("data.num_train", *_ALL_OR_COUNT),
    ("data.num_test", *_ALL_OR_COUNT),
    ("data.image_size", *_POSITIVE_INT),
    ("data.test_split_size", *_POSITIVE_INT),
    ("classifier.width", *_POSITIVE_INT),
    ("classifier.num_steps", *_POSITIVE_INT),
    ("classifier.batch_size", *_POSITIVE_INT),
    ("classifier.learning_rate", *_POSITIVE),
    ("autoencoder.kind", *_choice("rae", "vae")),
    ("autoencoder.latent_dim", *_POSITIVE_INT),
    ("autoencoder.widths", *_POSITIVE_INTS),
    ("autoencoder.blocks_per_stage", *_NONNEG_INT),
    ("autoencoder.decoder_head", *_choice("upsample", "subpixel")),
    ("autoencoder.beta", *_NONNEG),
    ("autoencoder.noise_std", *_NONNEG),
    ("autoencoder.vae_latents", *_choice("sample", "mean")),
    ("autoencoder.num_steps", *_POSITIVE_INT),
    ("autoencoder.batch_size", *_POSITIVE_INT),
    ("autoencoder.learning_rate", *_POSITIVE),
    ("autoencoder.warmup_steps", *_NONNEG_INT),
    ("autoencoder.grad_clip", *_NONNEG),
    ("reduction.epsilon", *_POSITIVE),
    ("reduction.parametrisation", *_choice("auto", "subspace", "ridge", "lowrank", "linear_mlp", "mlp")),
    ("reduction.bottleneck", *_POSITIVE_INT),
    ("reduction.width", *_POSITIVE_INT),
    ("reduction.depth", *_POSITIVE_INT),
    ("reduction.divergence", *_choice("exact", "hutchinson")),
    ("reduction.num_probes", *_POSITIVE_INT),
    ("reduction.threshold_grid", *_NONNEG_FLOATS),
    ("reduction.penalty", *_NONNEG),
    ("reduction.weight_decay", *_NONNEG),
    ("reduction.learning_rate", *_POSITIVE),
    ("reduction.batch_size", *_POSITIVE_INT),
    ("reduction.max_steps", *_NONNEG_INT),
    ("reduction.eval_every", *_POSITIVE_INT),
    ("reduction.patience", *_POSITIVE_INT),
    ("reduction.held_out_fraction", *_OPEN_UNIT),
    ("reduction.min_rank", *_NONNEG_INT),
    ("reduction.max_rank", lambda v: _int(v) and v >= -1, "-1 (none) or an integer >= 0"),
    ("reduction.ica_directions", *_NONNEG_INT),
    ("reduction.marginal_knots", *_NONNEG_INT),
    ("reduction.smoothing_grid", *_NONNEG_FLOATS),
    ("reduction.ica_samples", *_NONNEG_INT),
    ("reduction.energy_smoothing", *_NONNEG),
    ("reduction.ica_refine_rounds", *_NONNEG_INT),
    ("reduction.ica_deflation_rounds", *_NONNEG_INT),
    ("reduction.ica_polish_rounds", *_NONNEG_INT),
    ("reduction.ica_refine_tolerance", *_NONNEG),
    ("reduction.significance", *_NONNEG),
    ("sde.name", *_choice("vpsde", "vesde")),
    ("sde.beta_min", *_POSITIVE),
    ("sde.beta_max", *_POSITIVE),
    ("sde.sigma_min", *_POSITIVE),
    ("sde.sigma_max", *_POSITIVE),
    ("sde.N", *_POSITIVE_INT),
    ("prior.model", *_choice("mlp", "unet")),
    ("prior.hidden", *_POSITIVE_INT),
    ("prior.num_layers", *_POSITIVE_INT),
    ("prior.time_embed_dim", *_POSITIVE_INT),
    ("prior.num_steps", *_POSITIVE_INT),
    ("prior.batch_size", *_POSITIVE_INT),
    ("prior.learning_rate", *_POSITIVE),
    ("prior.warmup_steps", *_NONNEG_INT),
    ("prior.grad_clip", *_NONNEG),
    ("prior.ema_decay", *_PROBABILITY),
    ("prior.width", *_POSITIVE_INT),
    ("prior.mults", *_POSITIVE_INTS),
    ("prior.num_res_blocks", *_POSITIVE_INT),
    ("prior.eval_every", *_NONNEG_INT),
    ("prior.eval_examples", *_POSITIVE_INT),
    ("prior.uncond_share", *_PROBABILITY),
    ("prior.absent_prob", *_PROBABILITY),
    ("prior.eps", *_OPEN_UNIT),
    ("sampling.num_steps", *_POSITIVE_INT),
    ("sampling.corrector_steps", *_NONNEG_INT),
    ("sampling.snr", *_NONNEG),
    ("sampling.eps", *_OPEN_UNIT),
    ("sampling.batch_size", *_POSITIVE_INT),
    ("sampling.guidance", *_NONNEG),
    ("sampling.joint_guidance", *_NONNEG),
    ("sampling.clean_conditioning", lambda v: isinstance(v, bool), "True or False"),
    ("eval.num_examples", *_POSITIVE_INT),
    ("eval.max_subsets", *_ALL_OR_COUNT),
    ("eval.num_unconditional", *_POSITIVE_INT),
    ("eval.grid_examples", *_POSITIVE_INT),
)


def _get(config, dotted):
  """config[a][b]... or None when a key on the way is missing."""
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return None, False
    node = node[part]
  return node, True


def _non_finite_keys(node, prefix=""):
  """Dotted keys of every NaN/inf float (also inside tuples) under `node`."""
  out = []
  for key in node.keys():
    value, name = node[key], f"{prefix}{key}"
    if hasattr(value, "keys"):
      out += _non_finite_keys(value, name + ".")
    else:
      items = value if isinstance(value, (tuple, list)) else (value,)
      if any(isinstance(x, float) and not math.isfinite(x) for x in items):
        out.append(name)
  return out


def validate_config(config, stages=()):
  """Raises ConfigError naming the first config key whose value is out of range.

  Checked once, at the start of `train_and_evaluate`, before anything is
  read or written. Keys the config does not have are skipped.

  Args:
    config: the full ConfigDict.
    stages: the valid values of `config.stage` besides "".
  """
  bad = _non_finite_keys(config)
  if bad:
    raise ConfigError(f"config.{bad[0]}={_get(config, bad[0])[0]!r} is not finite; "
                      f"give a finite value (--config.{bad[0]}=...)")
  for key, test, what in RULES:
    value, present = _get(config, key)
    if present and not test(value):
      raise ConfigError(f"config.{key}={value!r}: must be {what} "
                        f"(--config.{key}=...)")
  stage, present = _get(config, "stage")
  if present and stage and stage not in stages:
    raise ConfigError(f"config.stage={stage!r}: expected one of {tuple(stages)} "
                      "or '' (all stages)")
  checks = (
      ("sde.beta_max", lambda c: c.sde.beta_max > c.sde.beta_min, "must exceed sde.beta_min"),
      ("sde.sigma_max", lambda c: c.sde.sigma_max > c.sde.sigma_min,
       "must exceed sde.sigma_min"),
      ("reduction.max_rank",
       lambda c: c.reduction.max_rank < 0 or c.reduction.max_rank >= c.reduction.min_rank,
       "must be -1 or >= reduction.min_rank"),
      ("reduction.max_steps",
       lambda c: c.reduction.max_steps > 0 or c.reduction.parametrisation != "mlp",
       "0 means 'the linear fit alone', which parametrisation 'mlp' does not have"),
      # The sampler must not ask for what the prior is not trained on.
      ("sampling.clean_conditioning",
       lambda c: not c.sampling.clean_conditioning or c.prior.clean_count_dist != "none",
       "needs a prior trained with clean modalities; prior.clean_count_dist='none' "
       "trains none (use sampling.clean_conditioning=False)"),
      ("sampling.guidance",
       lambda c: not c.sampling.guidance or (c.prior.absent_prob > 0
                                             and c.prior.clean_count_dist != "none"),
       "needs a prior trained with absent modalities (prior.absent_prob > 0 and clean "
       "modalities to make absent); use sampling.guidance=0"),
      ("sampling.joint_guidance",
       lambda c: not c.sampling.joint_guidance or (c.prior.absent_prob > 0
                                                   and c.prior.clean_count_dist != "none"),
       "needs a prior trained with absent modalities (each modality's marginal: "
       "prior.absent_prob > 0 and clean modalities to make absent); use "
       "sampling.joint_guidance=0"),
  )
  for key, test, what in checks:
    try:
      ok = test(config)
    except (AttributeError, KeyError):  # a config without that section or key
      ok = True
    if not ok:
      raise ConfigError(f"config.{key}={_get(config, key)[0]!r}: {what}")


# Keys that may differ between the runs of one workdir: they change how a run
# logs, checkpoints or which stage it runs, not what it computes; and the
# `sampling` and `eval` sections, which only the evaluate stage reads, and it
# is recomputed in full (its outputs overwritten) on every run.
MAY_DIFFER = ("stage", "log_every", "checkpoint_every", "allow_config_change",
              "data.cache_dir", "sampling", "eval")
_TRAINED = ("classifier", "autoencoders", "reduce", "prior")
# Config section -> the stages whose saved results it shapes. A changed key
# matters only once one of these stages has started in the workdir (e.g.
# turning the reduction on after the autoencoders, before the prior, is fine).
# A section not listed shapes every trained stage.
AFFECTS = {"classifier": ("classifier",), "autoencoder": ("autoencoders",),
           "reduction": ("reduce", "prior"), "sde": ("prior",), "prior": ("prior",)}


def _flat(node, prefix=""):
  out = {}
  for key in node.keys():
    value = node[key]
    if hasattr(value, "keys"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return out


def config_differences(saved, config, started=_TRAINED):
  """Keys whose value differs between two configs and that matter for `started`.

  Args:
    saved: the config the workdir was made with.
    config: the new config.
    started: names of the stages that have outputs in the workdir.

  Returns:
    list of (dotted key, saved value, new value), keys in `MAY_DIFFER` and keys
    whose stages (`AFFECTS`) have not started left out; a key only one side
    has counts, with None for the side that lacks it.
  """
  a, b = _flat(saved), _flat(config)

  def matters(key):
    if any(key == p or key.startswith(p + ".") for p in MAY_DIFFER):
      return False
    return bool(set(AFFECTS.get(key.split(".")[0], _TRAINED)) & set(started))

  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and matters(k)]


def check_same_run(saved, config, started, where):
  """Raises RunMismatchError listing the keys in which `config` differs from `saved`.

  Args:
    saved: the config the workdir was made with (`RunDir.load_config`).
    config: the config of this invocation.
    started: names of the stages that have outputs in the workdir.
    where: the saved config's path, for the message.

  Returns:
    The differences (empty unless config.allow_config_change is set).
  """
  diff = config_differences(saved, config, started)
  if not diff or config.get("allow_config_change", False):
    return diff
  shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:8])
  more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
  raise RunMismatchError(
      f"{where} was written by a run with another config: {shown}{more}. Stages "
      f"{list(started)} were made with the old values. Use a new --workdir (or delete "
      "this one), or pass --config.allow_config_change=True to continue with the new "
      "values (finished stages are kept, not retrained)")
