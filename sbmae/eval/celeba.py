"""CelebAMask-HQ scores: attribute F1, mask F1, image Frechet distance.

Protocol (DESIGN.md "Evaluation", as in SBM-AE's CelebAMask-HQ evaluation).
For every conditioning subset S, a non-empty proper subset of (image, mask,
attrs), the missing modalities of the first `eval.num_examples` test tuples are
sampled given the observed ones, and each generated modality is scored
(`{metric}/given_{S}`, S written like "image+mask"):
  attrs_f1       attribute F1 against the tuple's true attributes;
  mask_f1        pixel F1 of the mask against the tuple's true mask;
  fd_pixels      Frechet distance between Gaussians fitted to generated and
                 to real test images area-downsampled to 16x16 (768 pixel
                 features in [0, 1]). It is NOT FID and is named so that no one
                 mistakes it for FID;
  fid            true FID (InceptionV3 pool3, `sbmae.inception`), added when
                 `eval.inception_path` points to local weights.
F1 (both): decoder probabilities are thresholded at p > 0.5 (strict, like the
SBM-AE evaluation), F1 = 2 TP / (2 TP + FP + FN) is computed per example over
its 18 attributes or its S*S pixels and averaged over examples (sklearn's
`f1_score(average="samples")`). An example with neither true nor predicted
positives (0/0) scores 0, sklearn's default and what published SBM-AE numbers
used.

Two reference rows frame the conditional ones:
  unconditional  `eval.num_unconditional` joint samples. fd_pixels/fid measure
                 sample quality. Their F1s pair sample i with test tuple i by
                 position only, so they are a chance level: what the marginals
                 alone score, which conditional F1s should clearly beat.
  reconstruction every modality encoded and decoded (through the reduction
                 when there is one): the ceiling the autoencoders allow.
`sbmae.eval.driver` generates the outputs; this module scores them. Metrics
go to `RunDir.eval_metrics` (flat, plus "per_subset") and TensorBoard;
`eval/given_{S}.png` etc. show rows of test data next to the model's output
(image, mask and the names of the attributes that are on, `sbmae.eval.sheets`).
"""

import numpy as np

from sbmae.data import celeba
from sbmae.eval import frechet
from sbmae.eval import inception
from sbmae.eval import sheets

IMAGE, MASK, ATTRS = celeba.MODALITIES
THRESHOLD = sheets.THRESHOLD
PIXEL_FD_SIZE = 16
# What each metric scores: the modality it needs generated.
METRIC_MODALITY = {"attrs_f1": ATTRS, "mask_f1": MASK, "fd_pixels": IMAGE, "fid": IMAGE}


def binary_f1(pred, true, zero_division=0.0):
  """Per-example F1 of binary predictions.

  Args:
    pred: bool [N, ...] predicted positives.
    true: bool [N, ...] true positives, same shape.
    zero_division: score of an example with neither true nor predicted
      positives.

  Returns:
    float64 [N]: 2 TP / (2 TP + FP + FN) over each example's entries.
  """
  pred = np.asarray(pred, bool).reshape(len(pred), -1)
  true = np.asarray(true, bool).reshape(len(true), -1)
  tp = np.sum(pred & true, axis=1)
  denominator = np.sum(pred, axis=1) + np.sum(true, axis=1)  # = 2 TP + FP + FN
  return np.where(denominator > 0, 2.0 * tp / np.maximum(denominator, 1), zero_division)


def sample_f1(prob, true):
  """Sample-averaged F1 of probabilities [N, ...] against {0, 1} truth [N, ...]."""
  return float(np.mean(binary_f1(np.asarray(prob) > THRESHOLD, np.asarray(true) > THRESHOLD)))


def pixel_features(image_batch, size=PIXEL_FD_SIZE):
  """Images [N, S, S, C] in [0, 1] -> their size x size area averages, flat [N, size^2 C]."""
  x = np.asarray(image_batch, np.float64)
  n, h, w, c = x.shape
  if h % size or w % size:
    raise ValueError(f"fd_pixels needs image sides divisible by {size}, got {h}x{w}")
  x = x.reshape(n, size, h // size, size, w // size, c).mean(axis=(2, 4))
  return x.reshape(n, -1)


class Scorer:
  """Scores generated outputs against the test tuples and the real images.

  The interface every data set's scorer has (`sbmae.eval.driver`):
  conditional / unconditional / reconstruction scores of one output,
  `summarise` into flat metrics, and `picture`.
  """

  def __init__(self, config, run, names, truth, labels):
    """Args: full config, RunDir, modality names, test data dict, labels (unused)."""
    del labels  # CelebAMask-HQ has no class label.
    if set(names) != set(celeba.MODALITIES):
      raise ValueError(f"expected modalities {celeba.MODALITIES}, got {names}")
    self.run, self.names, self.truth = run, tuple(names), truth
    self.num_pictures = config.eval.grid_examples
    path = config.eval.inception_path
    self.feature_fn = inception.get_feature_fn(path) if path else None
    self.real_pixels = pixel_features(truth[IMAGE])
    self.real_inception = None
    if self.feature_fn is not None:
      self.real_inception = inception.features(self.feature_fn, truth[IMAGE], batch_size=50)

  def conditional(self, output, observed):
    """Scores of the modalities not in `observed` (a tuple of names)."""
    return self._score(output, set(self.names) - set(observed))

  def unconditional(self, output):
    """Scores of joint samples (their F1s pair sample i with tuple i: chance level)."""
    return self._score(output, set(self.names))

  def reconstruction(self, output):
    """Scores of encode -> decode of the test tuples: the ceiling."""
    return self._score(output, set(self.names))

  def summarise(self, conditional, unconditional, reconstruction):
    """Flat metrics and per-subset records.

    Returns:
      (metrics, per_subset): flat `metric_key` -> value; record label -> scores.
    """
    per_subset = {label(s): v for by_subset in conditional.values() for s, v in by_subset.items()}
    per_subset.update(unconditional=unconditional, reconstruction=reconstruction)
    metrics = {metric_key(k, lab): v for lab, scores in per_subset.items()
               for k, v in scores.items()}
    return metrics, per_subset

  @staticmethod
  def save_examples(path, arrays, names, num=8):
    """A sheet of the first `num` training tuples (`sheets.save_examples`)."""
    del names  # always image, mask, attrs
    sheets.save_examples(path, arrays, num)

  def picture(self, kind, output, observed=(), index=0):
    """A sheet of the first tuples, test data beside the output (not for unconditional).

    Args:
      kind: "conditional", "unconditional" or "reconstruction".
      output: dict name -> [N, ...] decoded output.
      observed: the observed names (conditional).
      index: the subset's position among those of its size (unused: with
        three modalities every subset gets its sheet).
    """
    del index
    name = label(observed) if kind == "conditional" else kind
    first = lambda arrays: {k: np.asarray(v[:self.num_pictures]) for k, v in arrays.items()}
    sheets.save_sheet(self.run.eval_picture(name), first(output),
                      None if kind == "unconditional" else first(self.truth),
                      title=name.replace("_", " "))

  def _score(self, output, generated):
    """dict metric -> value for the modalities in `generated`."""
    scores = {}
    m = min(len(output[IMAGE]), len(self.truth[IMAGE]))
    if ATTRS in generated:
      scores["attrs_f1"] = sample_f1(output[ATTRS][:m], self.truth[ATTRS][:m])
    if MASK in generated:
      scores["mask_f1"] = sample_f1(output[MASK][:m], self.truth[MASK][:m])
    if IMAGE in generated:
      scores["fd_pixels"] = frechet.feature_distance(self.real_pixels,
                                                  pixel_features(output[IMAGE]))
      if self.feature_fn is not None:
        scores["fid"] = frechet.feature_distance(
            self.real_inception,
            inception.features(self.feature_fn, output[IMAGE], batch_size=50))
    return scores


def label(observed):
  """Record label of a conditioning subset: "given_image+mask"."""
  return "given_" + "+".join(observed)


def metric_key(metric, record):
  """Flat key of a metric: "attrs_f1/given_image", "fd_pixels/image/unconditional", ..."""
  if metric in ("fd_pixels", "fid"):  # per-modality distances, named like PolyMNIST's.
    return f"{metric}/{METRIC_MODALITY[metric]}/{record}"
  return f"{metric}/{record}"
