"""Stage `evaluate`: one sampling loop for every data set; a scorer per data set.

For the first `eval.num_examples` test tuples the driver
  * encodes them and decodes them again (the reconstruction ceiling),
  * for every number k = 1..M-1 of observed modalities and every evaluated
    subset S of size k (all C(M, k), or a seeded balanced sample of
    `eval.max_subsets`: `subsets_of_size`),
    generates the missing modalities given S,
  * draws `eval.num_unconditional` joint samples,
and hands each output to the data set's scorer (`SCORERS`), which turns it
into numbers (coherence for PolyMNIST, F1s and Frechet distances for
CelebAMask-HQ), pictures, and the flat metrics written to
`RunDir.eval_metrics` and TensorBoard. A scorer is built as
Scorer(config, run_dir, names, truth, labels) and has
  conditional(output, observed) -> scores    (observed: tuple of names)
  unconditional(output) -> scores
  reconstruction(output) -> scores
  summarise(conditional, unconditional, reconstruction) -> (metrics, per_subset)
      with conditional = {k: {observed: scores}}
  save_examples(path, arrays, names, num)  (static: the data examples picture)
  picture(kind, output, observed=(), index=0)  (kind: "conditional",
      "unconditional" or "reconstruction"; index: the subset's position
      among the evaluated subsets of its size)

Randomness: one base key for the stage (`stages.stage_rng`); subset j of size
k samples with fold_in(fold_in(key, k), j), the joint samples with the
UNCONDITIONAL stream and the reconstructions with the RECONSTRUCTION stream
(their discarded directions, when there is a reduction), so every number is
reproducible on its own.
"""

import itertools
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sbmae import faults
from sbmae import stages
from sbmae import training
from sbmae.data import input_pipeline
from sbmae.eval import celeba
from sbmae.eval import polymnist

STAGE = "evaluate"
SCORERS = {"polymnist": polymnist.Scorer, "celeba": celeba.Scorer}
# fold_in streams of the stage key (conditional subsets use k = 1..M-1).
UNCONDITIONAL = 100
RECONSTRUCTION = 300


def subsets_of_size(num_modalities, k, max_subsets, rng):
  """The subsets (sorted tuples of indices) of size k that are evaluated.

  All C(M, k) of them when `max_subsets` is -1 or at least C(M, k). Otherwise
  a seeded *balanced* sample: every modality is observed in k n / M of the n
  subsets (rounded down or up), so each one is missing equally often. A plain
  random sample is not: with 5 of the 120 subsets of size 7 of PolyMNIST-10 a
  modality is missing from 0 to 5 of them (1.5 on average), and coherence is
  an average over the missing modalities, whose reconstruction ceilings differ
  (0.60-0.96 in the cpu runs).
  Built in rounds of at most M subsets: a seeded random cyclic order of the
  modalities, and windows of k consecutive modalities starting at M / r evenly
  spaced positions (r the round's size); a round is redrawn if it repeats a
  subset; after 100 failed draws (only when n is close to C(M, k)) the rest is
  filled greedily with the unused subsets whose modalities are observed least,
  and the balance can be off by more than one.

  Args:
    num_modalities: M.
    k: subset size, 1 <= k < M.
    max_subsets: -1 for all C(M, k); else how many subsets n.
    rng: numpy Generator for the sample.
  """
  all_subsets = list(itertools.combinations(range(num_modalities), k))
  if max_subsets < 0 or max_subsets >= len(all_subsets):
    return all_subsets
  chosen = set()
  while len(chosen) < max_subsets:
    size = min(num_modalities, max_subsets - len(chosen))
    starts = np.arange(size) * num_modalities // size
    for _ in range(100):
      order = rng.permutation(num_modalities)
      new = {tuple(sorted(order[(s + np.arange(k)) % num_modalities].tolist())) for s in starts}
      if len(new) == size and not new & chosen:
        chosen |= new
        break
    else:  # greedily: the unused subset whose modalities are observed least so far.
      counts = np.zeros(num_modalities)
      for s in chosen:
        counts[list(s)] += 1
      unused = [s for s in all_subsets if s not in chosen]
      while len(chosen) < max_subsets:
        cost = [counts[list(s)].sum() for s in unused]
        best = unused.pop(int(np.argmin(cost + rng.random(len(unused)) * 0.5)))
        counts[list(best)] += 1
        chosen.add(best)
  return sorted(chosen)


def pad_rows(x, size):
  """Pads the leading axis to `size` by repeating the first row (fixed shapes, one compile)."""
  if len(x) == size:
    return x
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.concatenate([x, xp.repeat(x[:1], size - len(x), axis=0)])


def chunked(fn, arrays, batch_size):
  """fn(i, chunk_i) over chunks of dict name -> [N, ...], padded to `batch_size`.

  Returns:
    fn's outputs (a pytree of [batch, ...]) trimmed and concatenated to [N, ...].
  """
  n = len(next(iter(arrays.values())))
  outs = []
  for i, start in enumerate(range(0, n, batch_size)):
    size = min(batch_size, n - start)
    out = fn(i, {k: pad_rows(v[start:start + size], batch_size) for k, v in arrays.items()})
    outs.append(jax.tree.map(lambda v, size=size: v[:size], out))
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)


def generate(mm, rng, flat, mask, batch_size):
  """Decoded samples for every row of `flat` [N, D] given the modality mask [M].

  Rows are sampled in padded chunks of `batch_size` (one compiled sampler per
  subset size: joint guidance computes only the unobserved modalities'
  marginals), each chunk split over this process's devices.

  Returns:
    dict name -> [N, ...]: observed modalities reconstructed, the others generated.
  """
  def one(i, chunk):
    key = jax.random.fold_in(rng, i)
    observed, (params, sample_key) = training.shard_local(chunk["flat"],
                                                          (mm.prior_params, key))
    # Back on the host: the decoders' parameters live on the default device.
    latents = jax.device_get(mm.sampler(sample_key, params, observed, mask,
                                        min_observed=int(np.sum(mask))))
    return mm.decode(latents, jax.random.fold_in(key, 1))
  return chunked(one, {"flat": flat}, batch_size)


def run(config, run_dir, mm, test_arrays, writer):
  """Evaluates a trained MultimodalModel; writes metrics JSON, TensorBoard and PNGs.

  Args:
    config: full config.
    run_dir: the `RunDir`.
    mm: `sbmae.system.MultimodalModel`.
    test_arrays: dict name -> test array (uint8 images, bool binary
      modalities) and "label" where the data set has one.
    writer: metrics Writer.

  Returns:
    dict of metrics.
  """
  e, names = config.eval, mm.names
  bs = config.sampling.batch_size
  rng = stages.stage_rng(config, STAGE)
  n = min(e.num_examples, len(test_arrays[names[0]]))
  truth = {k: jnp.asarray(input_pipeline.as_float(test_arrays[k][:n])) for k in names}
  labels = np.asarray(test_arrays["label"][:n]) if "label" in test_arrays else None
  scorer = SCORERS[config.data.name](config, run_dir, names, truth, labels)
  t0 = time.perf_counter()
  flat = chunked(lambda _, chunk: mm.encode(chunk), truth, bs)

  recon_rng = jax.random.fold_in(rng, RECONSTRUCTION)
  recon = chunked(lambda i, chunk: mm.decode(chunk["flat"], jax.random.fold_in(recon_rng, i)),
                  {"flat": flat}, bs)
  reconstruction = scorer.reconstruction(recon)
  conditional = {}
  subset_rng = np.random.default_rng(config.seed)
  for k in range(1, len(names)):
    conditional[k] = {}
    for j, subset in enumerate(subsets_of_size(len(names), k, e.max_subsets, subset_rng)):
      mask = np.isin(np.arange(len(names)), subset)
      observed = tuple(names[i] for i in subset)
      output = generate(mm, jax.random.fold_in(jax.random.fold_in(rng, k), j), flat, mask, bs)
      conditional[k][observed] = scorer.conditional(output, observed)
      if jax.process_index() == 0:
        scorer.picture("conditional", output, observed, j)
    logging.info("[eval] k=%d: %d subsets scored (%.0f s so far)", k, len(conditional[k]),
                 time.perf_counter() - t0)
    faults.point(f"evaluate:k{k}")

  empty = jnp.zeros((e.num_unconditional, sum(mm.dims)), jnp.float32)
  uncond = generate(mm, jax.random.fold_in(rng, UNCONDITIONAL), empty,
                    np.zeros(len(names), bool), bs)
  unconditional = scorer.unconditional(uncond)
  if jax.process_index() == 0:
    scorer.picture("unconditional", uncond)
    scorer.picture("reconstruction", recon)
  metrics, per_subset = scorer.summarise(conditional, unconditional, reconstruction)
  metrics["time/eval_s"] = time.perf_counter() - t0

  writer.scalars(0, metrics, prefix="eval")
  writer.json(run_dir.eval_metrics, {"metrics": metrics, "per_subset": per_subset,
                                     "num_examples": n, "num_unconditional": e.num_unconditional})
  for key in sorted(metrics):
    logging.info("[eval] %s = %.4f", key, metrics[key])
  return metrics


def save_examples(config, path, arrays, names, num=8):
  """PNG of the first `num` training tuples, drawn the data set's way (its scorer's)."""
  SCORERS[config.data.name].save_examples(path, arrays, names, num)
