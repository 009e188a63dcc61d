"""Throughput of CelebAMask-HQ preprocessing (raw release -> arrays).

Writes `--num_images` synthetic 1024x1024 JPEG photos and 512x512 part masks
(skin plus `--parts_per_image` - 1 other parts, the release's typical count) in
the raw layout into a temporary folder, then times `celeba.read_split` at
`--image_size` with one worker and with every core, and the photo decoding
alone with and without libjpeg's reduced-scale decoding. Besides wall-clock
images/s it prints the CPU time per image (this process and its workers), which
stays meaningful when other jobs share the cores: the load average is printed
first for that reason.

Run:
  python bench/bench_celeba_preprocess.py --num_images=200
"""

import os
import pathlib
import resource
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from sbmae.data import celeba

_NUM_IMAGES = flags.DEFINE_integer("num_images", 200, "Synthetic images.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Output side.")
_PARTS = flags.DEFINE_integer("parts_per_image", 10, "Mask files per image.")
_FULL_SIZE = 30000


def _write_release(root, n, num_parts, seed=0):
  """Photo-like JPEGs (smooth field + mild noise) and rectangular masks."""
  rng = np.random.default_rng(seed)
  (root / celeba.IMAGE_DIR).mkdir(parents=True)
  names = [f"A{k}" for k in range(22)] + list(celeba.ATTRIBUTES)
  lines = [str(n), " ".join(names)]
  for i in range(n):
    low = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    photo = np.asarray(Image.fromarray(low).resize((1024, 1024),
                                                   Image.Resampling.BICUBIC))
    photo = np.clip(photo + rng.normal(0, 3, photo.shape), 0, 255)
    Image.fromarray(photo.astype(np.uint8)).save(
        root / celeba.IMAGE_DIR / f"{i}.jpg", quality=95)
    folder = root / celeba.MASK_DIR / str(i // celeba.MASK_FOLDER_SIZE)
    folder.mkdir(parents=True, exist_ok=True)
    parts = ["skin"] + list(rng.choice(celeba.MASK_PARTS, num_parts - 1,
                                       replace=False))
    for part in parts:
      mask = np.zeros((512, 512), np.uint8)
      top, left = rng.integers(0, 384, 2)
      h, w = rng.integers(32, 128 if part != "skin" else 384, 2)
      mask[top:top + h, left:left + w] = 255
      Image.fromarray(mask).save(folder / f"{i:05d}_{part}.png")
    lines.append(f"{i}.jpg " + " ".join(rng.choice(["1", "-1"], len(names))))
  (root / celeba.ATTRIBUTE_FILE).write_text("\n".join(lines) + "\n")


def _decode_rate(paths, size, draft):
  start = time.perf_counter()
  for path in paths:
    with Image.open(path) as im:
      if draft:
        im.draft("RGB", (2 * size, 2 * size))
      im.convert("RGB").resize((size, size), Image.Resampling.BOX)
  return len(paths) / (time.perf_counter() - start)


def _cpu_seconds():
  """User + system CPU time of this process and its finished children."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv):
  del argv
  n, size = _NUM_IMAGES.value, _IMAGE_SIZE.value
  cores = len(os.sched_getaffinity(0))
  print(f"{cores} cores, load average {os.getloadavg()[0]:.1f}")
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    start = time.perf_counter()
    _write_release(root, n, _PARTS.value)
    mb = sum(p.stat().st_size for p in root.rglob("*")) / 2**20
    print(f"wrote {n} images ({mb:.0f} MB, {_PARTS.value} masks each) in "
          f"{time.perf_counter() - start:.1f} s")
    paths = sorted((root / celeba.IMAGE_DIR).iterdir())
    for draft, name in ((False, "full"), (True, "reduced-scale")):
      print(f"photo decode + area resize, {name} JPEG decoding: "
            f"{_decode_rate(paths, size, draft):.1f} images/s")
    for workers in sorted({1, cores}):
      start, cpu = time.perf_counter(), _cpu_seconds()
      celeba.read_split(root, size, num_test=n // 5, num_workers=workers,
                        progress=False)
      rate = n / (time.perf_counter() - start)
      cpu_ms = (_cpu_seconds() - cpu) / n * 1e3
      print(f"read_split {size}px, {workers} worker(s): {rate:.1f} images/s, "
            f"{cpu_ms:.1f} CPU-ms/image (the full {_FULL_SIZE} would take "
            f"~{_FULL_SIZE / rate / 60:.1f} min)")


if __name__ == "__main__":
  app.run(main)
