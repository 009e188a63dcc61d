"""Stage `evaluate`: coherence, Frechet distances and sample grids (PolyMNIST).

Protocol (DESIGN.md "Evaluation"):
- conditional coherence for k observed modalities: for each subset S of size
  k, generate the missing modalities of `eval.num_examples` test tuples from
  the observed ones, classify every generated image with its modality's
  classifier and count it correct when it shows the tuple's label; average over
  the generated modalities, then over the subsets of size k. All C(M, k)
  subsets are used when `eval.max_subsets` is -1, else a fixed random sample
  (seeded by config.seed) of that many subsets per k.
- unconditional coherence: share of joint samples whose M predicted labels agree.
- `coherence/reconstruction_{m}`: classifier accuracy on decode(encode(x)) of
  the test images, through the prior's latent (so after the reduction, with
  the discarded directions drawn from N(0, I)). It is the ceiling on
  conditional coherence that the autoencoders and the reduction leave to the
  prior.
- `fd_clf/{m}`: Frechet distance between the classifier's penultimate features
  of unconditional samples and of real test images of modality m. It is NOT
  Inception FID (named so no one mistakes it); `fid/{m}` is added when
  `eval.inception_path` points to local InceptionV3 weights.
"""

import itertools
import pathlib
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sbmae import classifier as classifier_lib
from sbmae import frechet
from sbmae import images
from sbmae import training

STAGE = "eval"


def subsets_of_size(num_modalities, k, max_subsets, rng):
  """The subsets (tuples of indices) of size k that are evaluated."""
  all_subsets = list(itertools.combinations(range(num_modalities), k))
  if max_subsets < 0 or max_subsets >= len(all_subsets):
    return all_subsets
  pick = rng.choice(len(all_subsets), size=max_subsets, replace=False)
  return [all_subsets[i] for i in sorted(pick)]


def _chunks(n, size):
  """(start, stop) pairs covering range(n) in chunks of `size`."""
  return [(s, min(s + size, n)) for s in range(0, n, size)]


def pad_rows(x, size):
  """Pads the leading axis to `size` by repeating the first row (fixed shapes, one compile)."""
  if len(x) == size:
    return x
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.concatenate([x, xp.repeat(x[:1], size - len(x), axis=0)])


def generate_all(mm, rng, flat, mask, batch_size, decode=True):
  """Samples for every row of `flat` [N, D] given `mask` [M]; returns decoded images."""
  outs = []
  for i, (a, b) in enumerate(_chunks(len(flat), batch_size)):
    key = jax.random.fold_in(rng, i)
    observed, (params, sample_key) = training.shard_local(pad_rows(flat[a:b], batch_size),
                                                          (mm.prior_params, key))
    # Back on the host: the decoders' parameters live on the default device.
    latents = jax.device_get(mm.sampler(sample_key, params, observed, mask))[:b - a]
    outs.append(mm.decode(latents, jax.random.fold_in(key, 1)) if decode else latents)
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)


def label_accuracy(clf_logits, clf_params, images_by_name, labels):
  """dict name -> share of `images_by_name[name]` classified as `labels`."""
  logits = clf_logits({n: clf_params[n] for n in images_by_name}, images_by_name)
  return {n: float(np.mean(np.argmax(v, -1) == labels)) for n, v in logits.items()}


def conditional_coherence(mm, clf_logits, clf_params, flat, labels, subsets, rng, batch_size):
  """Mean accuracy of the generated modalities for each subset.

  Returns:
    dict subset (tuple of indices) -> coherence in [0, 1].
  """
  out = {}
  for j, subset in enumerate(subsets):
    mask = np.zeros(len(mm.names), bool)
    mask[list(subset)] = True
    generated = generate_all(mm, jax.random.fold_in(rng, j), flat, mask, batch_size)
    missing = {n: generated[n] for i, n in enumerate(mm.names) if not mask[i]}
    out[subset] = float(np.mean(list(
        label_accuracy(clf_logits, clf_params, missing, labels).values())))
  return out


def run(config, workdir, mm, test_arrays, writer):
  """Evaluates a trained MultimodalModel; writes metrics JSON, TensorBoard and PNGs.

  Args:
    config: full config.
    workdir: run folder; results go to `<workdir>/eval/`.
    mm: `sbmae.multimodal.MultimodalModel`.
    test_arrays: dict name -> test array (uint8 images) and "label".
    writer: metrics Writer.

  Returns:
    dict of metrics.
  """
  e, names = config.eval, mm.names
  out_dir = pathlib.Path(workdir) / STAGE
  rng = jax.random.PRNGKey(config.seed + 4)
  n = min(e.num_examples, len(test_arrays["label"]))
  batch = {k: jnp.asarray(test_arrays[k][:n], jnp.float32) / 255.0 for k in names}
  labels = np.asarray(test_arrays["label"][:n])
  flat = mm.encode(batch)
  clf_model, clf_params = classifier_lib.restore(config, workdir, names)
  clf_logits = classifier_lib.logits_fn(clf_model)
  bs = config.sampling.batch_size
  metrics, per_subset = {}, {}
  subset_rng = np.random.default_rng(config.seed)
  t0 = time.perf_counter()
  recon = mm.decode(flat, jax.random.fold_in(rng, 300))
  for nm, acc in label_accuracy(clf_logits, clf_params, recon, labels).items():
    metrics[f"coherence/reconstruction_{nm}"] = acc
  for k in range(1, len(names)):
    subsets = subsets_of_size(len(names), k, e.max_subsets, subset_rng)
    coh = conditional_coherence(mm, clf_logits, clf_params, flat, labels, subsets,
                                jax.random.fold_in(rng, k), bs)
    metrics[f"coherence/conditional_k{k}"] = float(np.mean(list(coh.values())))
    per_subset.update({"+".join(names[i] for i in s): v for s, v in coh.items()})
    logging.info("[eval] conditional coherence k=%d: %.4f over %d subsets (%.0f s so far)",
                 k, metrics[f"coherence/conditional_k{k}"], len(subsets),
                 time.perf_counter() - t0)
  metrics["coherence/conditional_mean"] = float(np.mean(
      [metrics[f"coherence/conditional_k{k}"] for k in range(1, len(names))]))

  num_unc = e.num_unconditional
  empty = jnp.zeros((num_unc, sum(mm.dims)), jnp.float32)
  uncond = generate_all(mm, jax.random.fold_in(rng, 100), empty, np.zeros(len(names), bool), bs)
  logits = clf_logits(clf_params, uncond)
  predicted = np.stack([np.argmax(logits[nm], -1) for nm in names])
  metrics["coherence/unconditional"] = float(np.mean(np.all(predicted == predicted[:1], axis=0)))

  features = classifier_lib.features_fn(clf_model)
  real_features = features(clf_params, batch)
  fake_features = features(clf_params, uncond)
  for nm in names:
    metrics[f"fd_clf/{nm}"] = frechet.feature_distance(real_features[nm], fake_features[nm])
  if e.inception_path:
    from sbmae import inception  # pylint: disable=g-import-not-at-top
    feature_fn = inception.get_feature_fn(e.inception_path)
    for nm in names:
      metrics[f"fid/{nm}"] = inception.fid(feature_fn, batch[nm], uncond[nm], batch_size=50)
  metrics["time/eval_s"] = time.perf_counter() - t0

  writer.scalars(0, metrics, prefix="eval")
  writer.json(f"{STAGE}/metrics.json", {"metrics": metrics, "per_subset": per_subset})
  if jax.process_index() == 0:
    save_grids(mm, batch, uncond, rng, out_dir, e.grid_examples, bs)
  for key in sorted(metrics):
    logging.info("[eval] %s = %.4f", key, metrics[key])
  return metrics


def save_grids(mm, batch, uncond, rng, out_dir, num, batch_size):
  """PNG grids: conditional samples for a few subsets, and unconditional samples.

  Conditional grid `conditional_{subset}.png`: row i shows the observed
  modalities of test tuple i (real) followed by the generated missing ones.
  """
  names = mm.names
  m = len(names)
  first = {k: v[:num] for k, v in batch.items()}
  flat = mm.encode(first)
  for subset in ((0,), tuple(range(m // 2)), tuple(range(m - 1))):
    mask = np.zeros(m, bool)
    mask[list(subset)] = True
    gen = generate_all(mm, jax.random.fold_in(rng, 200 + len(subset)), flat, mask, batch_size)
    row = [first[n] if mask[i] else gen[n] for i, n in enumerate(names)]
    label = "+".join(names[i] for i in subset)
    images.save_png(out_dir / f"conditional_given_{label}.png",
                    images.grid(np.stack([np.asarray(r) for r in row], axis=1)), scale=2)
  unc = np.stack([np.asarray(uncond[n][:num]) for n in names], axis=1)
  images.save_png(out_dir / "unconditional.png", images.grid(unc), scale=2)
