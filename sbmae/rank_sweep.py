"""How much of each modality's content survives the reduction, per epsilon.

  python -m sbmae.rank_sweep --config=configs/polymnist.py:cpu --workdir=W \
      --epsilons=0.5,0.2,0.1,0.05,0.02

For a run whose classifier, autoencoders and reduce stages are finished, re-chooses
the ranks for every epsilon from the fitted eigenvalues (no refit, no prior:
`Reduction.with_epsilon`), passes test images through encode -> project -> lift
(discarded directions drawn from N(0, I)) -> decode and reports the classifier's
accuracy on the result: the reconstruction coherence, the ceiling on
conditional coherence that a reduction at that epsilon leaves to the prior.
Writes `W/reduce/rank_sweep.json` and `W/reduce/rank_sweep.png`.
"""

import json
import pathlib

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from sbmae import autoencoders
from sbmae import classifier as classifier_lib
from sbmae import evaluate
from sbmae import reduction
from sbmae import train

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder with a finished reduce stage.")
_EPSILONS = flags.DEFINE_list("epsilons", ["1.0", "0.5", "0.2", "0.1", "0.05", "0.02"],
                              "KL targets to evaluate.")
flags.mark_flags_as_required(["config", "workdir"])


def sweep(config, workdir, epsilons, num_examples):
  """Rows {epsilon, ranks, total_rank, kl_bound, reconstruction_{m}, reconstruction_mean}.

  The last row is the unreduced latent (epsilon None).
  """
  workdir = pathlib.Path(workdir)
  data, mods = train.load_data(config, workdir)
  names = [m.name for m in mods]
  test = data["test"]
  batch = {n: jnp.asarray(test[n][:num_examples], jnp.float32) / 255.0 for n in names}
  labels = np.asarray(test["label"][:num_examples])
  ae_models, ae_params = autoencoders.restore(config, workdir, mods)
  stats = autoencoders.LatentStats.load(workdir / autoencoders.STAGE / "latent_stats.npz")
  fitted = reduction.Reduction.restore(workdir / train.REDUCTION_DIR)
  clf_model, clf_params = classifier_lib.restore(config, workdir, names)
  clf_logits = classifier_lib.logits_fn(clf_model)
  latents = stats.whiten(autoencoders.encode_fn(ae_models)(ae_params, batch))
  decode = autoencoders.decode_fn(ae_models, mods)
  rng = jax.random.PRNGKey(config.seed + 5)
  rows = []
  for eps in list(epsilons) + [None]:
    if eps is None:
      red, restored = None, latents
      row = {"epsilon": None, "ranks": [int(fitted.dims[n]) for n in names], "kl_bound": 0.0}
    else:
      red = fitted.with_epsilon(eps, config.reduction.min_rank, config.reduction.max_rank)
      restored = red.lift(red.project(latents), rng)
      row = {"epsilon": eps, "ranks": list(red.rank_tuple), "kl_bound": red.kl_bound}
    acc = evaluate.label_accuracy(clf_logits, clf_params,
                                  decode(ae_params, stats.unwhiten(restored)), labels)
    row.update({f"reconstruction_{n}": a for n, a in acc.items()},
               total_rank=sum(row["ranks"]), reconstruction_mean=float(np.mean(list(acc.values()))))
    logging.info("epsilon %s: ranks %s (total %d), KL bound %.3f, reconstruction coherence "
                 "%.3f", eps, row["ranks"], row["total_rank"], row["kl_bound"],
                 row["reconstruction_mean"])
    rows.append(row)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config, workdir = flags.FLAGS.config, pathlib.Path(_WORKDIR.value)
  rows = sweep(config, workdir, [float(e) for e in _EPSILONS.value], config.eval.num_examples)
  out = workdir / train.REDUCTION_DIR
  (out / "rank_sweep.json").write_text(json.dumps(rows, indent=1))
  from sbmae import plots  # pylint: disable=g-import-not-at-top  (matplotlib is slow to import)
  plots.plot_rank_sweep(rows, out / "rank_sweep.png")


if __name__ == "__main__":
  app.run(main)
