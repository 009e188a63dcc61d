"""MNIST digits from the usual offline forms, and scikit-learn's bundled digits.

Sources, in the order `load_mnist` tries them when no path is given:
  1. `$SBMAE_MNIST` (a file or a folder),
  2. the `search` paths the caller gives (the config's `data.mnist_search`),
     relative ones taken from the working directory,
  3. tfds `mnist` (only where a network or a prepared tfds data dir exists).
A path may be a Keras-style `mnist.npz` (x_train, y_train, x_test, y_test) or a folder
holding the four idx-ubyte files, gzipped or not. Nothing falls back to other data:
when no source is found the error lists every place that was tried.
"""

import gzip
import os
import pathlib
import zipfile
import zlib

from absl import logging
import numpy as np
from PIL import Image

from sbmae import errors

ENV_VAR = "SBMAE_MNIST"
_IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
HOW_TO_GET = (
    "Provide real MNIST as a Keras-style mnist.npz or a folder with the four "
    "idx-ubyte files (train-images-idx3-ubyte[.gz], ...), via "
    "--config.data.mnist_path=PATH or the environment variable SBMAE_MNIST; or "
    "use --config.data.digits=sklearn_digits for the small bundled digits.")


class MnistNotFoundError(errors.DataError, FileNotFoundError):
  """No MNIST source could be found or read."""


def _bad(where, problem):
  return errors.DataError(
      f"{where}: {problem}. This is not a readable MNIST (a truncated download?); "
      f"fetch it again or point elsewhere. {HOW_TO_GET}")


def _read_idx(path):
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise _bad(path, f"cannot read it ({type(e).__name__}: {e})") from e
  magic = int.from_bytes(data[:4], "big")
  if magic >> 8 != 0x08:  # 0x08: unsigned byte data.
    raise _bad(path, f"not an idx-ubyte file (magic {magic:#x})")
  ndim = magic & 0xFF
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  if len(data) < 4 + 4 * ndim:
    raise _bad(path, f"{len(data)} bytes, too short for an idx header")
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise _bad(path, f"expected {shape} bytes of data, found {array.size}")
  return array.reshape(shape)


def _read_idx_folder(folder):
  arrays = {}
  for key, name in _IDX_NAMES.items():
    candidates = [folder / name, folder / (name + ".gz")]
    found = [c for c in candidates if c.exists()]
    if not found:
      raise MnistNotFoundError(
          f"{folder}: missing {name} (or {name}.gz). {HOW_TO_GET}")
    arrays[key] = _read_idx(found[0])
  return arrays


def _read_path(path):
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    arrays = _read_idx_folder(path)
  elif path.is_file():
    try:
      with np.load(path, allow_pickle=False) as f:
        if not hasattr(f, "files"):
          raise _bad(path, "a single array, not an .npz archive")
        missing = [k for k in _IDX_NAMES if k not in f]
        if missing:
          raise errors.DataError(f"{path}: missing arrays {missing}; expected the Keras "
                                 "mnist.npz keys x_train, y_train, x_test, y_test")
        arrays = {k: f[k] for k in _IDX_NAMES}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
      if isinstance(e, errors.SbmaeError):
        raise
      raise _bad(path, f"cannot read it as .npz ({type(e).__name__}: {e})") from e
  else:
    raise MnistNotFoundError(f"MNIST path {path} does not exist. {HOW_TO_GET}")
  return _validated(arrays, str(path))


def _validated(arrays, where):
  """Checks shapes, dtypes and labels; returns uint8 images and int32 labels."""
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
      raise errors.DataError(f"{where}: {split} images {x.shape} / labels {y.shape} "
                             "are not [N, 28, 28] / [N]")
    if x.dtype != np.uint8:
      raise errors.DataError(f"{where}: {split} images have dtype {x.dtype}; MNIST "
                             "images are uint8 in 0..255 (convert them first)")
    if not np.issubdtype(y.dtype, np.integer) or len(y) == 0 or y.min() < 0 or y.max() > 9:
      raise errors.DataError(f"{where}: {split} labels must be integers 0..9 "
                             f"(dtype {y.dtype}, {len(y)} labels)")
  classes = np.unique(arrays["y_train"])
  if len(classes) < 2:
    raise errors.DataError(f"{where}: the train split holds only digit(s) {classes.tolist()}; "
                           "coherence needs at least two classes (MNIST has ten)")
  return {k: np.asarray(v, np.uint8 if k[0] == "x" else np.int32)
          for k, v in arrays.items()}


def _from_tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  arrays = {}
  for split in ("train", "test"):
    data = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1))
    arrays[f"x_{split}"] = data["image"][..., 0]
    arrays[f"y_{split}"] = data["label"]
  return _validated(arrays, "tfds:mnist")


def load_mnist(path="", search=()):
  """Loads real MNIST.

  Args:
    path: an mnist.npz file or a folder of idx-ubyte files; empty searches
      $SBMAE_MNIST, then `search`, then tfds (see module docstring).
    search: candidate paths tried in order when `path` and $SBMAE_MNIST are
      empty.

  Returns:
    Dict with x_train uint8[60000, 28, 28], y_train int32[60000], x_test,
    y_test.

  Raises:
    MnistNotFoundError: no source found; the message lists where it looked.
  """
  if path:
    return _read_path(path)
  tried = []
  env = os.environ.get(ENV_VAR, "")
  if env:
    return _read_path(env)
  tried.append(f"${ENV_VAR} (unset)")
  for candidate in search:
    candidate = pathlib.Path(candidate).expanduser().resolve()
    if candidate.exists():
      logging.info("Reading MNIST from %s", candidate)
      return _read_path(candidate)
    tried.append(str(candidate))
  try:
    return _from_tfds()
  except Exception as e:  # pylint: disable=broad-except
    tried.append(f"tfds mnist ({type(e).__name__}: {str(e)[:120]})")
  raise MnistNotFoundError(
      "No MNIST found. Looked in: " + "; ".join(tried) + ". " + HOW_TO_GET)


def load_sklearn_digits(test_fraction=0.2, seed=0):
  """Scikit-learn's bundled 8x8 digits resized to 28x28, in MNIST's layout.

  1,797 small digits that ship inside scikit-learn, so the quickstart needs no
  download. They are NOT MNIST: use them for smoke runs only.

  Args:
    test_fraction: share of the digits held out as the test split.
    seed: seed of the train/test split.

  Returns:
    Dict like `load_mnist`'s (uint8 images in 0..255, white digit on black).
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = (digits.images * (255.0 / 16.0)).astype(np.uint8)
  # 8x8 -> 20x20 (bicubic), centred in 28x28 like MNIST's 20x20 box.
  big = np.zeros((len(images), 28, 28), np.uint8)
  for i, im in enumerate(images):
    big[i, 4:24, 4:24] = np.asarray(
        Image.fromarray(im).resize((20, 20), Image.Resampling.BICUBIC))
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(big))
  n_test = int(round(test_fraction * len(big)))
  test, train = order[:n_test], order[n_test:]
  logging.info("Using scikit-learn's 8x8 digits resized to 28x28 (%d train, "
               "%d test); these are not MNIST.", len(train), len(test))
  return {"x_train": big[train], "y_train": labels[train],
          "x_test": big[test], "y_test": labels[test]}
