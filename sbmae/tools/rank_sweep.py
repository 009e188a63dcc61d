"""How much of each modality's content survives the reduction, per epsilon.

  python -m sbmae.tools.rank_sweep --config=configs/polymnist.py:cpu --workdir=W \
      --epsilons=0.5,0.2,0.1,0.05,0.02

For a run whose classifier, autoencoders and reduce stages are finished, re-chooses
the ranks for every epsilon from the fitted eigenvalues (no refit, no prior:
`Reduction.with_epsilon`), passes test images through encode -> project -> lift
(discarded directions drawn from N(0, I)) -> decode and reports the classifier's
accuracy on the result: the reconstruction coherence, the ceiling on
conditional coherence that a reduction at that epsilon leaves to the prior.
Writes `RunDir.rank_sweep` .json and .png (in W/reduce).

With `--ceiling_tolerance=T` it also names the choice by what a rank keeps:
the smallest total rank among the swept epsilons whose reconstruction
coherence is within T of the full latent's, with its estimated bound and
ceiling (printed and stored as "choice" in the JSON); pass that epsilon as
`--config.reduction.epsilon` to fit the prior on it.
"""

import json

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from sbmae import pipeline
from sbmae import rundir
from sbmae import stages
from sbmae.data import input_pipeline
from sbmae.eval import polymnist
from sbmae.stages import autoencoders
from sbmae.stages import classifier as classifier_lib
from sbmae.stages import reduce

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder with a finished reduce stage.")
_EPSILONS = flags.DEFINE_list("epsilons", ["1.0", "0.5", "0.2", "0.1", "0.05", "0.02"],
                              "KL targets to evaluate.")
_TOLERANCE = flags.DEFINE_float("ceiling_tolerance", None,
                                "Choose the smallest total rank whose reconstruction coherence "
                                "is within this of the full latent's.")
flags.mark_flags_as_required(["config", "workdir"])


def sweep(config, workdir, epsilons, num_examples):
  """Rows {epsilon, ranks, total_rank, estimated_kl_bound, reconstruction_{m}, reconstruction_mean}.

  The last row is the unreduced latent (epsilon None).
  """
  run = rundir.RunDir(workdir)
  data, mods = pipeline.load_data(config, run)
  names = [m.name for m in mods]
  test = data["test"]
  batch = {n: jnp.asarray(input_pipeline.as_float(test[n][:num_examples])) for n in names}
  labels = np.asarray(test["label"][:num_examples])
  ae_models, ae_params, stats = autoencoders.restore(config, run, mods)
  fitted = reduce.restore(run)
  clf_model, clf_params = classifier_lib.restore(config, run, names)
  clf_logits = classifier_lib.logits_fn(clf_model)
  latents = stats.whiten(autoencoders.encode_fn(ae_models)(ae_params, batch))
  decode = autoencoders.decode_fn(ae_models)
  rng = stages.stage_rng(config, "rank_sweep")
  rows = []
  for eps in list(epsilons) + [None]:
    if eps is None:
      red, restored = None, latents
      row = {"epsilon": None, "ranks": [int(fitted.dims[n]) for n in names], "estimated_kl_bound": 0.0}
    else:
      red = fitted.with_epsilon(eps, config.reduction.min_rank, config.reduction.max_rank)
      restored = red.lift(red.project(latents), rng)
      row = {"epsilon": eps, "ranks": list(red.rank_tuple), "estimated_kl_bound": red.estimated_kl_bound}
    acc = polymnist.label_accuracy(clf_logits, clf_params,
                                  decode(ae_params, stats.unwhiten(restored)), labels)
    row.update({f"reconstruction_{n}": a for n, a in acc.items()},
               total_rank=sum(row["ranks"]), reconstruction_mean=float(np.mean(list(acc.values()))))
    logging.info("epsilon %s: ranks %s (total %d), estimated KL bound %.3f, reconstruction coherence "
                 "%.3f", eps, row["ranks"], row["total_rank"], row["estimated_kl_bound"],
                 row["reconstruction_mean"])
    rows.append(row)
  return rows


def choose_by_ceiling(rows, tolerance):
  """The reduced row of smallest total rank whose ceiling is within `tolerance` of full.

  Args:
    rows: `sweep` output (its last row is the full latent).
    tolerance: allowed drop of the mean reconstruction coherence.

  Returns:
    That row, or None when no swept epsilon keeps enough.
  """
  full = [r for r in rows if r["epsilon"] is None][0]["reconstruction_mean"]
  good = [r for r in rows if r["epsilon"] is not None
          and r["reconstruction_mean"] >= full - tolerance]
  return min(good, key=lambda r: r["total_rank"]) if good else None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config, run = flags.FLAGS.config, rundir.RunDir(_WORKDIR.value)
  rows = sweep(config, run.root, [float(e) for e in _EPSILONS.value], config.eval.num_examples)
  result = {"rows": rows}
  if _TOLERANCE.value is not None:
    choice = choose_by_ceiling(rows, _TOLERANCE.value)
    result["choice"] = choice
    if choice is None:
      logging.warning("no swept epsilon keeps the ceiling within %g of the full latent's; "
                      "sweep smaller epsilons", _TOLERANCE.value)
    else:
      logging.info("choice within %g of the full ceiling: epsilon %g, total rank %d, "
                   "estimated KL bound %.3f, reconstruction coherence %.3f", _TOLERANCE.value,
                   choice["epsilon"], choice["total_rank"], choice["estimated_kl_bound"],
                   choice["reconstruction_mean"])
  run.rank_sweep.with_suffix(".json").write_text(json.dumps(result, indent=1))
  from sbmae.reduction import plots  # pylint: disable=g-import-not-at-top  (matplotlib is slow to import)
  plots.plot_rank_sweep(rows, run.rank_sweep.with_suffix(".png"))


if __name__ == "__main__":
  app.run(main)
