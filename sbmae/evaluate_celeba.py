"""Stage `evaluate` for CelebAMask-HQ: attribute F1, mask F1, image Frechet distance.

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
Metrics go to `<workdir>/eval/metrics.json` (flat, plus "per_subset") and
TensorBoard; `<workdir>/eval/given_{S}.png` etc. show rows of test data next to
the model's output (image, mask and the names of the attributes that are on).
"""

import itertools
import pathlib
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageDraw

from sbmae import evaluate
from sbmae import frechet
from sbmae import images
from sbmae import inception
from sbmae.data import celeba

STAGE = "eval"
IMAGE, MASK, ATTRS = celeba.MODALITIES
THRESHOLD = 0.5
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



def proper_subsets(names):
  """Every non-empty proper subset of `names`, by size, as tuples of names."""
  return [s for k in range(1, len(names)) for s in itertools.combinations(names, k)]



def _chunked(fn, arrays, batch_size):
  """fn(i, chunk_i) over padded chunks of dict name -> [N, ...], concatenated as numpy."""
  n = len(next(iter(arrays.values())))
  outs = []
  for i, start in enumerate(range(0, n, batch_size)):
    size = min(batch_size, n - start)
    out = fn(i, {k: evaluate.pad_rows(np.asarray(v[start:start + size]), batch_size)
                 for k, v in arrays.items()})
    outs.append(jax.tree.map(lambda v, size=size: np.asarray(v)[:size], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


class _Scorer:
  """Scores generated outputs against the test tuples and the real images."""

  def __init__(self, truth, feature_fn):
    self.truth = truth
    self.feature_fn = feature_fn
    self.real_pixels = pixel_features(truth[IMAGE])
    self.real_inception = None
    if feature_fn is not None:
      self.real_inception = inception.features(feature_fn, truth[IMAGE], batch_size=50)

  def __call__(self, output, generated):
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


def metric_key(metric, label):
  """Flat key of a metric: "attrs_f1/given_image", "fd_pixels/image/unconditional", ..."""
  if metric in ("fd_pixels", "fid"):  # per-modality distances, named like PolyMNIST's.
    return f"{metric}/{METRIC_MODALITY[metric]}/{label}"
  return f"{metric}/{label}"


def run(config, workdir, mm, test_arrays, writer):
  """Evaluates a trained MultimodalModel on CelebAMask-HQ; writes JSON, TensorBoard, PNGs.

  Args:
    config: full config.
    workdir: run folder; results go to `<workdir>/eval/`.
    mm: `sbmae.multimodal.MultimodalModel` with modalities image, mask, attrs.
    test_arrays: dict name -> uint8 test array (mask and attrs in {0, 255}).
    writer: metrics Writer.

  Returns:
    dict of metrics (module docstring).
  """
  e, names = config.eval, mm.names
  if set(names) != set(celeba.MODALITIES):
    raise ValueError(f"expected modalities {celeba.MODALITIES}, got {names}")
  out_dir = pathlib.Path(workdir) / STAGE
  rng = jax.random.PRNGKey(config.seed + 4)
  bs = config.sampling.batch_size
  n = min(e.num_examples, len(test_arrays[IMAGE]))
  truth = {k: np.asarray(test_arrays[k][:n], np.float32) / 255.0 for k in names}
  flat = _chunked(lambda _, b: mm.encode(b), truth, bs)
  feature_fn = inception.get_feature_fn(e.inception_path) if e.inception_path else None
  score = _Scorer(truth, feature_fn)
  num_grid = min(e.grid_examples, n)
  metrics, per_subset = {}, {}
  t0 = time.perf_counter()

  def record(label, output, generated, show_truth=True):
    per_subset[label] = score(output, generated)
    metrics.update({metric_key(k, label): v for k, v in per_subset[label].items()})
    if jax.process_index() == 0:
      first = lambda arrays: {k: np.asarray(v[:num_grid]) for k, v in arrays.items()}
      save_sheet(out_dir / f"{label}.png", first(output), first(truth) if show_truth else None,
                 title=label.replace("_", " "))
    logging.info("[eval] %s: %s (%.0f s so far)", label,
                 " ".join(f"{k}={v:.4f}" for k, v in per_subset[label].items()),
                 time.perf_counter() - t0)

  for j, subset in enumerate(proper_subsets(names)):
    observed = np.array([nm in subset for nm in names])
    output = evaluate.generate_all(mm, jax.random.fold_in(rng, j), jnp.asarray(flat),
                                   observed, bs)
    record("given_" + "+".join(subset), output, set(names) - set(subset))

  empty = jnp.zeros((e.num_unconditional, sum(mm.dims)), jnp.float32)
  output = evaluate.generate_all(mm, jax.random.fold_in(rng, 100), empty,
                                 np.zeros(len(names), bool), bs)
  record("unconditional", output, set(names), show_truth=False)

  output = _chunked(lambda i, b: mm.decode(b["flat"], jax.random.fold_in(rng, 200 + i)),
                    {"flat": flat}, bs)
  record("reconstruction", output, set(names))
  metrics["time/eval_s"] = time.perf_counter() - t0

  writer.scalars(0, metrics, prefix="eval")
  writer.json(f"{STAGE}/metrics.json", {
      "metrics": metrics, "per_subset": per_subset,
      "num_examples": n, "num_unconditional": e.num_unconditional})
  for key in sorted(metrics):
    logging.info("[eval] %s = %.4f", key, metrics[key])
  return metrics


def _text_width():
  draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  return int(max(draw.textlength(a) for a in celeba.ATTRIBUTES)) + 8


def _image_panel(x, cell):
  return Image.fromarray(images.to_uint8(x)).resize((cell, cell), Image.Resampling.NEAREST)


def _attrs_panel(prob, true, width, height):
  """Names of the attributes with p > 0.5; green/red for right/wrong when `true` is given."""
  panel = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(panel)
  on = [i for i, p in enumerate(prob) if p > THRESHOLD]
  line = 12
  fits = max(1, (height - 4) // line)
  if len(on) > fits:  # the last line says how many did not fit.
    on, more = on[:fits - 1], len(on) - fits + 1
  else:
    more = 0
  for row, i in enumerate(on):
    color = "black" if true is None else ("darkgreen" if true[i] > THRESHOLD else "red")
    draw.text((4, 2 + row * line), celeba.ATTRIBUTES[i], fill=color)
  if more:
    draw.text((4, 2 + len(on) * line), f"+{more} more", fill="gray")
  if not on and not more:
    draw.text((4, 2), "(none)", fill="gray")
  return panel


def save_sheet(path, output, truth=None, title="", name="sample"):
  """PNG of rows (image, mask, attribute names) per example.

  Args:
    path: output file.
    output: dict image/mask/attrs -> [R, ...] floats in [0, 1].
    truth: optional matching test data, shown on the left of each row; the
      output's attribute names are then green where right, red where wrong.
    title: line of text on top.
    name: column label of `output` when there is no `truth` ("output" otherwise).

  Returns:
    The path written.
  """
  size = output[IMAGE].shape[1]
  cell = size * max(1, 128 // size)  # room for ~10 attribute names.
  text_w, header = _text_width(), 14
  blocks = ([("data", truth, None)] if truth is not None else []) + [
      ("output" if truth is not None else name, output, truth)]
  block_w = 2 * cell + text_w + 8
  rows = len(output[IMAGE])
  sheet = Image.new("RGB", (len(blocks) * block_w + 4, 2 * header + rows * (cell + 4) + 4),
                    "white")
  draw = ImageDraw.Draw(sheet)
  draw.text((4, 1), title, fill="black")
  for b, (name, data, reference) in enumerate(blocks):
    x0 = 4 + b * block_w
    for c, label in enumerate((IMAGE, MASK, ATTRS)):
      draw.text((x0 + c * (cell + 4), header + 1), f"{name}: {label}", fill="gray")
    for r in range(rows):
      y = 2 * header + r * (cell + 4)
      sheet.paste(_image_panel(data[IMAGE][r], cell), (x0, y))
      sheet.paste(_image_panel(data[MASK][r], cell), (x0 + cell + 4, y))
      sheet.paste(_attrs_panel(data[ATTRS][r], None if reference is None else reference[ATTRS][r],
                               text_w, cell), (x0 + 2 * cell + 8, y))
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  sheet.save(path)
  return path


def save_examples(path, arrays, num=8):
  """PNG of the first `num` tuples of uint8 data arrays (mask and attrs in {0, 255})."""
  data = {k: np.asarray(arrays[k][:num], np.float32) / 255.0 for k in celeba.MODALITIES}
  return save_sheet(path, data, title="CelebAMask-HQ training tuples", name="data")
