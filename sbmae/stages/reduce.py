"""Stage `reduce`: the per-modality dimension reduction of the whitened latents.

Fits `sbmae.reduction.reduction.fit` to the autoencoders' whitened training
latents (`config.reduction`), saves it with its plots in `RunDir.reduction`,
and is skipped when a saved reduction exists.
"""

import time

from absl import logging
import jax

from sbmae import errors
from sbmae import stages
from sbmae.reduction import reduction

STAGE = "reduce"


def summary(run):
  """The saved reduction's summary file: written last, so its presence says the stage is done."""
  return run.reduction / reduction.SUMMARY_FILE


def restore(run):
  """The saved `Reduction` of `run` (a RunDir); StageOrderError naming the stage."""
  if not summary(run).exists():
    raise errors.StageOrderError(f"no reduction in {run.reduction}; run the `{STAGE}` stage "
                                 "first")
  return reduction.Reduction.restore(run.reduction)


def train(config, run, latents, names):
  """Fits (or loads) the reduction and writes its plots.

  Args:
    config: full config (its `reduction` section).
    run: the `RunDir`.
    latents: dict name -> whitened training latents [N, d_m].
    names: modality order.

  Returns:
    The `Reduction`.
  """
  if summary(run).exists():
    return restore(run)
  t0 = time.perf_counter()
  red = reduction.fit({n: latents[n] for n in names}, epsilon=config.reduction.epsilon,
                      rng=stages.stage_rng(config, STAGE), config=config.reduction)
  logging.info("[reduce] ranks %s, estimated KL bound %.4f, %.1f s", red.ranks, red.estimated_kl_bound,
               time.perf_counter() - t0)
  if jax.process_index() == 0:
    from sbmae.reduction import plots  # pylint: disable=g-import-not-at-top  (matplotlib is slow to import)
    plots.save_all(red, run.reduction)
    red.save(run.reduction)
  return red
