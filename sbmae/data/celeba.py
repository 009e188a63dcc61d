"""CelebAMask-HQ from the official raw release, preprocessed once and cached.

Raw layout under the root folder (the release as unpacked):
  CelebA-HQ-img/{i}.jpg                        1024x1024 RGB photos
  CelebAMask-HQ-mask-anno/{i // 2000}/{i:05d}_{part}.png
                                               512x512 part masks, 0 or 255
  CelebAMask-HQ-attribute-anno.txt             count, 40 names, row per image
Masks are looked up by file name in every numbered folder, so a re-foldered
copy reads the same.

Three modalities per image at `image_size` (128, or 64 for small runs):
  image  uint8[S, S, 3]  area (antialiased) downsampling of the photo;
  mask   uint8[S, S, 1]  in {0, 1}: union of `MASK_PARTS` at the masks' own
                         resolution, then nearest-neighbour resampling;
  attrs  uint8[18]       `ATTRIBUTES` as {0, 1} (1 where the file says 1).

The mask is every annotated part except `skin` (17 of the 18): nose, eyes,
brows, ears, mouth and lips, hair, hat, eyeglasses (eye_g), earrings (ear_r),
and also neck, necklace (neck_l) and cloth. In the release `skin` labels the
face skin only, while neck, necklace and cloth have labels of their own, so
"non-skin" includes them. The choice lives in `MASK_PARTS` alone (bump
`CACHE_VERSION` when changing it).

The images are the rows of the attribute file (images on disk without a row are
ignored). Split by image index: the last `num_test` are the test split, the rest
train; with the full release and the default 5000 that is the standard first
25,000 / last 5,000.
"""

import concurrent.futures
import multiprocessing
import os
import pathlib
import re
import time

from absl import logging
import numpy as np
from PIL import Image

from sbmae import errors
from sbmae import faults

ATTRIBUTES = (
    "Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows",
    "Eyeglasses", "Gray_Hair", "Heavy_Makeup", "Male", "Mouth_Slightly_Open",
    "Mustache", "Pale_Skin", "Receding_Hairline", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Hat")
MODALITIES = ("image", "mask", "attrs")
PARTS = (
    "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear",
    "r_ear", "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l",
    "neck", "cloth")
MASK_PARTS = tuple(p for p in PARTS if p != "skin")

IMAGE_DIR = "CelebA-HQ-img"
MASK_DIR = "CelebAMask-HQ-mask-anno"
ATTRIBUTE_FILE = "CelebAMask-HQ-attribute-anno.txt"
# The release stores masks of images [2000k, 2000k + 2000) in folder k.
MASK_FOLDER_SIZE = 2000
# Bump when the preprocessing changes, so stale caches are rebuilt.
CACHE_VERSION = 1
HOW_TO_GET = (
    "Download the CelebAMask-HQ release linked from its authors' GitHub page "
    "(github.com/switchablenorms/CelebAMask-HQ), unpack it, and pass the "
    "folder holding CelebA-HQ-img/, CelebAMask-HQ-mask-anno/ and "
    "CelebAMask-HQ-attribute-anno.txt as --config.data.path=...")

_MASK_NAME = re.compile(r"^(\d{5})_(%s)\.png$" % "|".join(PARTS))
_ROW_NAME = re.compile(r"^(\d+)\.jpg$")
_LOG_EVERY_S = 10.0
_SERIAL_CHUNK = 64  # images between progress updates without workers.


class CelebANotFoundError(errors.DataError, FileNotFoundError):
  """A folder or file of the raw release is missing."""


class CelebADataError(errors.DataError):
  """A file of the raw release is malformed or unreadable."""


def _read_attributes(path):
  """Parses the attribute file into (indices int32[N], attrs uint8[N, 18])."""
  if not path.is_file():
    raise CelebANotFoundError(f"Missing attribute file {path}. {HOW_TO_GET}")
  with open(path) as f:
    lines = f.read().splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  if len(lines) < 2:
    raise CelebADataError(
        f"{path}: expected a count line and a header line, found {len(lines)} "
        "line(s)")
  try:
    count = int(lines[0].strip())
  except ValueError:
    raise CelebADataError(
        f"{path}:1: count line {lines[0]!r} is not an integer") from None
  names = lines[1].split()
  missing = [a for a in ATTRIBUTES if a not in names]
  if missing:
    raise CelebADataError(
        f"{path}:2: header lacks required attribute(s) {missing}")
  columns = [names.index(a) for a in ATTRIBUTES]
  rows = lines[2:]
  if count != len(rows):
    raise CelebADataError(
        f"{path}:1: count line says {count} images but the file has "
        f"{len(rows)} rows")
  indices = np.empty(len(rows), np.int64)
  attrs = np.empty((len(rows), len(ATTRIBUTES)), np.uint8)
  seen = {}
  for k, row in enumerate(rows):
    lineno = k + 3
    fields = row.split()
    match = _ROW_NAME.match(fields[0]) if fields else None
    if not match:
      raise CelebADataError(
          f"{path}:{lineno}: row does not start with an image name '<i>.jpg': "
          f"{row[:60]!r}")
    if len(fields) - 1 != len(names):
      raise CelebADataError(
          f"{path}:{lineno}: {len(fields) - 1} values for {len(names)} "
          "attributes")
    bad = [v for v in fields[1:] if v not in ("1", "-1")]
    if bad:
      raise CelebADataError(
          f"{path}:{lineno}: value {bad[0]!r} is not 1 or -1")
    index = int(match.group(1))
    if index in seen:
      raise CelebADataError(
          f"{path}:{lineno}: {fields[0]} already listed on line {seen[index]}")
    seen[index] = lineno
    indices[k] = index
    values = fields[1:]
    attrs[k] = [values[c] == "1" for c in columns]
  order = np.argsort(indices, kind="stable")
  return indices[order].astype(np.int32), attrs[order]


def _check_folders(root):
  if not root.is_dir():
    raise CelebANotFoundError(
        f"CelebAMask-HQ root folder {root} does not exist. {HOW_TO_GET}")
  for name in (IMAGE_DIR, MASK_DIR):
    if not (root / name).is_dir():
      raise CelebANotFoundError(
          f"Missing folder {root / name} (expected inside the CelebAMask-HQ "
          f"root). {HOW_TO_GET}")


def _find_masks(mask_root):
  """Maps image index -> list of mask paths, over every numbered subfolder."""
  found = {}
  for folder in sorted(os.scandir(mask_root), key=lambda e: e.name):
    if not (folder.is_dir() and folder.name.isdigit()):
      continue
    for entry in os.scandir(folder.path):
      match = _MASK_NAME.match(entry.name)
      if match and match.group(2) in MASK_PARTS:
        found.setdefault(int(match.group(1)), []).append(entry.path)
      elif match:  # skin: not in the mask, but the image does have masks.
        found.setdefault(int(match.group(1)), [])
  return found


def _source_paths(root, indices):
  """Image path and mask-part paths of every row, checked to exist."""
  image_root, mask_root = root / IMAGE_DIR, root / MASK_DIR
  on_disk = set(os.listdir(image_root))
  masks = _find_masks(mask_root)
  tasks = []
  for i in indices.tolist():
    image = f"{i}.jpg"
    if image not in on_disk:
      raise CelebANotFoundError(
          f"Missing image {image_root / image} (listed in {ATTRIBUTE_FILE})")
    if i not in masks:
      raise CelebADataError(
          f"Image {image_root / image} has no mask file: looked for "
          f"{i:05d}_<part>.png in every numbered folder of {mask_root} (the "
          f"release puts it in {mask_root / str(i // MASK_FOLDER_SIZE)})")
    tasks.append((str(image_root / image), sorted(masks[i])))
  return tasks


def _load_image(path, size):
  try:
    with Image.open(path) as im:
      # Let libjpeg decode at a reduced scale (its DCT scaling is itself a
      # low-pass), never below 2x the target so the final area resize does the
      # last antialiased step; this halves the decoding time at 1024 -> 128.
      im.draft("RGB", (2 * size, 2 * size))
      im = im.convert("RGB")
      im = im.resize((size, size), Image.Resampling.BOX)
      return np.asarray(im)
  except (OSError, ValueError) as e:
    raise CelebADataError(f"Cannot read image {path}: {e}") from None


def _nearest_index(n_in, n_out):
  # Pixel-centre convention, the same as PIL's NEAREST.
  return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64),
                    n_in - 1)


def _load_mask(paths, size):
  union = None
  for path in paths:
    try:
      with Image.open(path) as im:
        part = np.asarray(im if im.mode == "L" else im.convert("L"))
    except (OSError, ValueError) as e:
      raise CelebADataError(f"Cannot read mask {path}: {e}") from None
    if union is None:
      union = part > 127
    elif part.shape != union.shape:
      raise CelebADataError(
          f"Mask {path} is {part.shape}, other parts of its image are "
          f"{union.shape}")
    else:
      union |= part > 127
  if union is None:  # only a skin mask: no non-skin part at all.
    return np.zeros((size, size, 1), np.uint8)
  rows = _nearest_index(union.shape[0], size)
  cols = _nearest_index(union.shape[1], size)
  return union[np.ix_(rows, cols)].astype(np.uint8)[..., None]


def _load_chunk(tasks, size):
  images = np.empty((len(tasks), size, size, 3), np.uint8)
  masks = np.empty((len(tasks), size, size, 1), np.uint8)
  for k, (image_path, mask_paths) in enumerate(tasks):
    images[k] = _load_image(image_path, size)
    masks[k] = _load_mask(mask_paths, size)
  return images, masks


class _Progress:
  """Logs images/s and the ETA at most every `_LOG_EVERY_S` seconds."""

  def __init__(self, total, size, enabled):
    self.total, self.size, self.enabled = total, size, enabled
    self.done = 0
    self.start = self.last = time.perf_counter()

  def update(self, n):
    self.done += n
    now = time.perf_counter()
    if not self.enabled or (now - self.last < _LOG_EVERY_S and
                            self.done < self.total):
      return
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    logging.info("CelebAMask-HQ %dpx: %d/%d images, %.1f images/s, ETA %.0f s",
                 self.size, self.done, self.total, rate,
                 (self.total - self.done) / rate)


def _load_all(tasks, size, num_workers, progress):
  """Reads every task, in order, over `num_workers` processes."""
  n = len(tasks)
  images = np.empty((n, size, size, 3), np.uint8)
  masks = np.empty((n, size, size, 1), np.uint8)
  tracker = _Progress(n, size, progress)
  if num_workers <= 1:
    for start in range(0, n, _SERIAL_CHUNK):
      chunk = tasks[start:start + _SERIAL_CHUNK]
      images[start:start + len(chunk)], masks[start:start + len(chunk)] = (
          _load_chunk(chunk, size))
      tracker.update(len(chunk))
    return images, masks
  # Several chunks per worker balance the load; chunks of <= 128 keep each
  # result (~8 MB at 128px) cheap to send back.
  chunk_size = max(1, min(128, -(-n // (8 * num_workers))))
  # spawn, not fork: the parent usually has JAX's threads running already.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(num_workers, context) as pool:
    futures = {pool.submit(_load_chunk, tasks[s:s + chunk_size], size): s
               for s in range(0, n, chunk_size)}
    try:
      for future in concurrent.futures.as_completed(futures):
        start = futures[future]
        chunk_images, chunk_masks = future.result()
        images[start:start + len(chunk_images)] = chunk_images
        masks[start:start + len(chunk_masks)] = chunk_masks
        tracker.update(len(chunk_images))
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise
  return images, masks


def _split(data, num_test):
  n = len(data["index"])
  return {"train": {k: v[:n - num_test] for k, v in data.items()},
          "test": {k: v[n - num_test:] for k, v in data.items()}}


def _check_num_test(num_test, n, where):
  if not 0 < num_test < n:
    raise ValueError(f"num_test={num_test} must be in (0, {n}): {where} has "
                     f"{n} images")


def _read_all(root, image_size, num_test, num_workers, progress):
  """Every image of the release, in index order (split later)."""
  root = pathlib.Path(root).expanduser()
  _check_folders(root)
  indices, attrs = _read_attributes(root / ATTRIBUTE_FILE)
  _check_num_test(num_test, len(indices), root / ATTRIBUTE_FILE)
  tasks = _source_paths(root, indices)
  if num_workers is None:
    num_workers = len(os.sched_getaffinity(0))
  num_workers = max(1, min(num_workers, len(tasks)))
  logging.info("Reading %d CelebAMask-HQ images from %s at %dpx with %d "
               "worker(s)", len(tasks), root, image_size, num_workers)
  images, masks = _load_all(tasks, image_size, num_workers, progress)
  return {"image": images, "mask": masks, "attrs": attrs, "index": indices}


def read_split(root, image_size, *, num_test=5000, num_workers=None,
               progress=True):
  """Reads and preprocesses the raw release (no cache).

  Args:
    root: folder of the unpacked release (see module docstring).
    image_size: side S of the square outputs (128, or 64 for small runs).
    num_test: the last `num_test` images by index form the test split; the
      rest, train.
    num_workers: processes decoding images; None uses every available core.
    progress: log images/s and the ETA while reading.

  Returns:
    {"train": split, "test": split}, each split a dict with image uint8[N, S,
    S, 3], mask uint8[N, S, S, 1] in {0, 1}, attrs uint8[N, 18] in {0, 1}
    (order `ATTRIBUTES`) and index int32[N] (the image number i of i.jpg),
    sorted by index.

  Raises:
    CelebANotFoundError: the root, one of its folders, the attribute file or a
      listed image is missing.
    CelebADataError: a malformed attribute file (with its line number), an
      image without any mask file, or an unreadable image or mask.
  """
  return _split(_read_all(root, image_size, num_test, num_workers, progress),
                num_test)


def cache_path(cache_dir, image_size):
  """Path of the preprocessed cache for `image_size` inside `cache_dir`."""
  return pathlib.Path(cache_dir) / (
      f"celebamask_hq_{image_size}px_v{CACHE_VERSION}.npz")


def load_celeba(root, image_size, cache_dir, *, num_test=5000,
                num_workers=None):
  """Like `read_split`, but preprocesses once into `cache_dir` and reuses it.

  The cache holds every image (split at load time, so any `num_test` reuses
  it) in one uncompressed .npz named after `image_size`. It is written through
  a temporary file and `os.replace` only after the whole release was read and
  validated, so an error or an interruption never leaves a partial cache.

  Args:
    root: folder of the unpacked release; only read when there is no cache.
    image_size: side S of the square outputs.
    cache_dir: folder of the cache (created if needed).
    num_test: the last `num_test` images by index form the test split.
    num_workers: processes decoding images on a cache miss; None: all cores.

  Returns:
    The dict of `read_split`.

  Raises:
    The errors of `read_split`, on a cache miss. The cache is keyed by
    `image_size` only: delete it when the raw data changes.
  """
  path = cache_path(cache_dir, image_size)
  if path.exists():
    with np.load(path) as f:
      data = {k: f[k] for k in (*MODALITIES, "index")}
    logging.info("Read the CelebAMask-HQ %dpx cache %s (%d images)",
                 image_size, path, len(data["index"]))
  else:
    data = _read_all(root, image_size, num_test, num_workers, progress=True)
    with faults.atomic_write(path) as f:
      np.savez(f, **data)
    logging.info("Wrote the CelebAMask-HQ %dpx cache %s", image_size, path)
  _check_num_test(num_test, len(data["index"]), path)
  return _split(data, num_test)
