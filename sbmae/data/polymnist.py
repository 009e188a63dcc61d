"""PolyMNIST-M: one digit class seen through M coloured modalities.

Recipe (Sutter et al. 2021, as in DESIGN.md "Data"): tuple i of class c takes, for
modality k, a *different* MNIST image of class c (per-class index permutations,
one per modality); the digit is binarised at 128 and pasted on a random 28x28
crop of background image k with the digit's pixels inverted.

Built deterministically from a seed, cached once as .npz, or read from the
released layout `{train,test}/m{k}/{index}.{label}.png`.
"""

import dataclasses
import hashlib
import json
import pathlib
import re

from absl import logging
import numpy as np
from PIL import Image

from sbmae import errors
from sbmae import faults
from sbmae.data import mnist as mnist_lib

# Ten colour images that ship with scikit-image / scikit-learn (no download).
BUILTIN_BACKGROUNDS = (
    "skimage:astronaut", "skimage:chelsea", "skimage:coffee", "skimage:rocket",
    "sklearn:china.jpg", "skimage:hubble_deep_field",
    "skimage:immunohistochemistry", "skimage:retina", "sklearn:flower.jpg",
    "skimage:cat")
# Built-in backgrounds are shrunk to this longest side so that a 28x28 crop
# holds texture rather than one flat patch of colour.
_BUILTIN_MAX_SIDE = 256
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_RELEASED_NAME = re.compile(r"^(\d+)\.(\d)\.png$")


class PolyMnistError(errors.DataError):
  """Bad PolyMNIST input (released layout or backgrounds); names the path."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of PolyMNIST-M, all modalities stacked.

  Attributes:
    images: uint8[N, M, 28, 28, 3].
    labels: int32[N].
    source_index: int32[N, M], MNIST index of each image (-1 when unknown,
      as for the released data).
  """
  images: np.ndarray
  labels: np.ndarray
  source_index: np.ndarray

  @property
  def num_modalities(self):
    return self.images.shape[1]

  def take(self, n):
    """The first n tuples (all of them for n < 0)."""
    if n < 0 or n >= len(self.labels):
      return self
    return Split(self.images[:n], self.labels[:n], self.source_index[:n])


def _builtin_background(name):
  package, item = name.split(":")
  if package == "skimage":
    import skimage.data  # pylint: disable=g-import-not-at-top
    image = getattr(skimage.data, item)()
  else:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    sample = datasets.load_sample_images()
    image = sample.images[[pathlib.Path(f).name for f in sample.filenames].index(item)]
  image = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  image.thumbnail((_BUILTIN_MAX_SIDE, _BUILTIN_MAX_SIDE), Image.Resampling.LANCZOS)
  return np.asarray(image)


def load_backgrounds(source, num_modalities):
  """Returns `num_modalities` RGB background images (uint8 [H, W, 3] each).

  Args:
    source: "builtin" for the images shipped by scikit-image/scikit-learn, or a
      folder of image files (taken in sorted file-name order).
    num_modalities: how many backgrounds are needed.
  """
  if source == "builtin":
    if num_modalities > len(BUILTIN_BACKGROUNDS):
      raise PolyMnistError(
          f"only {len(BUILTIN_BACKGROUNDS)} built-in backgrounds; "
          f"num_modalities={num_modalities} needs a folder of backgrounds")
    return [_builtin_background(n) for n in BUILTIN_BACKGROUNDS[:num_modalities]]
  folder = pathlib.Path(source).expanduser()
  if not folder.is_dir():
    raise PolyMnistError(f"background folder {folder} does not exist")
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
  if len(files) < num_modalities:
    raise PolyMnistError(f"background folder {folder} has {len(files)} images; "
                         f"need {num_modalities}")
  backgrounds = []
  for f in files[:num_modalities]:
    try:
      image = np.asarray(Image.open(f).convert("RGB"))
    except OSError as e:
      raise PolyMnistError(f"cannot read background image {f}: {e}") from e
    if image.shape[0] < 28 or image.shape[1] < 28:
      raise PolyMnistError(f"background image {f} is smaller than 28x28")
    backgrounds.append(image)
  return backgrounds


def tuple_indices(labels, num_modalities, rng):
  """MNIST indices of every modality of every tuple.

  Tuple slots follow the MNIST order; slot i of class c takes, in modality k,
  the image at position (p_c[i] + o_ck) mod n_c of class c, with p_c a random
  permutation and o_ck distinct random offsets, so the M images of a tuple are
  distinct images of the same class.

  Args:
    labels: int[N] MNIST labels.
    num_modalities: M.
    rng: numpy Generator.

  Returns:
    int32[N, M] indices into the MNIST split.
  """
  index = np.empty((len(labels), num_modalities), np.int32)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    n = len(members)
    if n < num_modalities:
      raise PolyMnistError(f"class {c} has {n} images, fewer than M={num_modalities}")
    base = rng.permutation(n)
    offsets = rng.choice(n, size=num_modalities, replace=False)
    for k, o in enumerate(offsets):
      index[members, k] = members[(base + o) % n]
  return index


def paste_on_background(digits, background, rng):
  """Binarised digits pasted, inverted, on random 28x28 crops of `background`.

  Args:
    digits: uint8[N, 28, 28] MNIST digits.
    background: uint8[H, W, 3].
    rng: numpy Generator (draws the crop corners).

  Returns:
    (uint8[N, 28, 28, 3] images, int32[N, 2] crop corners (row, col)).
  """
  h, w, _ = background.shape
  corners = np.stack([rng.integers(0, h - 27, len(digits)),
                      rng.integers(0, w - 27, len(digits))], axis=1).astype(np.int32)
  windows = np.lib.stride_tricks.sliding_window_view(background, (28, 28), axis=(0, 1))
  crops = np.moveaxis(windows[corners[:, 0], corners[:, 1]], 1, -1)  # [N,28,28,3]
  on = (digits > 128)[..., None]
  return np.where(on, 255 - crops, crops).astype(np.uint8), corners


def build_split(x, y, backgrounds, seed):
  """Builds one PolyMNIST split from MNIST images `x` and labels `y`."""
  rng = np.random.default_rng(seed)
  index = tuple_indices(y, len(backgrounds), rng)
  images = np.empty((len(y), len(backgrounds), 28, 28, 3), np.uint8)
  for k, background in enumerate(backgrounds):
    images[:, k], _ = paste_on_background(x[index[:, k]], background, rng)
  return Split(images, np.asarray(y, np.int32), index)


def build(digits, backgrounds, seed):
  """Builds train and test splits (the test split uses seed + 1)."""
  return {"train": build_split(digits["x_train"], digits["y_train"], backgrounds, seed),
          "test": build_split(digits["x_test"], digits["y_test"], backgrounds, seed + 1)}


def read_released(root, num_modalities):
  """Reads the released PolyMNIST layout `{train,test}/m{k}/{index}.{label}.png`.

  Args:
    root: folder holding `train/` and `test/`.
    num_modalities: M; folders m0..m{M-1} must all exist.

  Returns:
    {"train": Split, "test": Split}, tuples ordered by file index.

  Raises:
    PolyMnistError: a missing split or modality folder, unequal file counts or
      index/label sets across modalities, a bad file name or an unreadable file.
  """
  root = pathlib.Path(root).expanduser()
  splits = {}
  for split in ("train", "test"):
    per_modality = []
    for k in range(num_modalities):
      folder = root / split / f"m{k}"
      if not folder.is_dir():
        raise PolyMnistError(f"missing modality folder {folder} (released PolyMNIST "
                             f"layout: {root}/{{train,test}}/m{{k}}/{{index}}.{{label}}.png)")
      entries = {}
      for f in folder.iterdir():
        match = _RELEASED_NAME.match(f.name)
        if not match:
          raise PolyMnistError(f"unexpected file {f}: names must be {{index}}.{{label}}.png")
        entries[int(match.group(1))] = (int(match.group(2)), f)
      per_modality.append(entries)
    counts = [len(e) for e in per_modality]
    if len(set(counts)) != 1:
      raise PolyMnistError(f"{root / split}: unequal file counts per modality {counts}")
    keys = sorted(per_modality[0])
    for k, entries in enumerate(per_modality[1:], start=1):
      if sorted(entries) != keys:
        raise PolyMnistError(f"{root / split}/m{k}: file indices differ from m0")
      bad = [i for i in keys if entries[i][0] != per_modality[0][i][0]]
      if bad:
        raise PolyMnistError(f"{root / split}/m{k}: label of index {bad[0]} differs from m0")
    images = np.empty((len(keys), num_modalities, 28, 28, 3), np.uint8)
    for k, entries in enumerate(per_modality):
      for row, i in enumerate(keys):
        path = entries[i][1]
        try:
          image = np.asarray(Image.open(path).convert("RGB"))
        except OSError as e:
          raise PolyMnistError(f"cannot read {path}: {e}") from e
        if image.shape != (28, 28, 3):
          raise PolyMnistError(f"{path}: shape {image.shape}, expected 28x28 RGB")
        images[row, k] = image
    labels = np.array([per_modality[0][i][0] for i in keys], np.int32)
    splits[split] = Split(images, labels, np.full((len(keys), num_modalities), -1, np.int32))
  return splits


def write_released(splits, root):
  """Writes splits in the released layout (used by tests and for export)."""
  root = pathlib.Path(root)
  for split, data in splits.items():
    for k in range(data.num_modalities):
      folder = root / split / f"m{k}"
      folder.mkdir(parents=True, exist_ok=True)
      for i, (image, label) in enumerate(zip(data.images[:, k], data.labels)):
        Image.fromarray(image).save(folder / f"{i}.{label}.png")


def _save_cache(splits, path, meta):
  arrays = {}
  for split, data in splits.items():
    for field in dataclasses.fields(Split):
      arrays[f"{split}/{field.name}"] = getattr(data, field.name)
  arrays["meta"] = np.array(json.dumps(meta))
  # Atomic (one temporary file per process): a killed run never leaves half a cache.
  with faults.atomic_write(path) as f:
    np.savez(f, **arrays)
    faults.point("data:write")


def _load_cache(path):
  try:
    with np.load(path) as f:
      return {split: Split(*(f[f"{split}/{fld.name}"] for fld in dataclasses.fields(Split)))
              for split in ("train", "test")}
  except Exception as e:  # pylint: disable=broad-except
    raise errors.DataError(f"data cache {path} is unreadable ({type(e).__name__}: {e}); "
                           "delete it and re-run to rebuild it") from e


def load(data_config, cache_dir, seed):
  """Returns {"train": Split, "test": Split} for `config.data`, cached.

  Args:
    data_config: the `data` section of the config.
    cache_dir: folder for the cached .npz.
    seed: builder seed.
  """
  m = data_config.num_modalities
  if data_config.released_path:
    source = {"released": str(pathlib.Path(data_config.released_path).resolve())}
  else:
    source = {"digits": data_config.digits, "mnist_path": data_config.mnist_path,
              "backgrounds": data_config.backgrounds, "seed": seed}
  meta = {"num_modalities": m, **source, "version": 1}
  key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:10]
  path = pathlib.Path(cache_dir) / f"polymnist{m}_{key}.npz"
  if path.exists():
    logging.info("Reading cached PolyMNIST-%d from %s", m, path)
    return _load_cache(path)
  if data_config.released_path:
    splits = read_released(data_config.released_path, m)
  else:
    if data_config.digits == "mnist":
      digits = mnist_lib.load_mnist(data_config.mnist_path, data_config.mnist_search)
    elif data_config.digits == "sklearn_digits":
      digits = mnist_lib.load_sklearn_digits(seed=seed)
    else:
      raise errors.ConfigError(f"config.data.digits={data_config.digits!r}: expected "
                       "'mnist' or 'sklearn_digits'")
    splits = build(digits, load_backgrounds(data_config.backgrounds, m), seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  _save_cache(splits, path, meta)
  logging.info("Wrote PolyMNIST-%d cache %s (%d train, %d test tuples)", m, path,
               len(splits["train"].labels), len(splits["test"].labels))
  return splits
