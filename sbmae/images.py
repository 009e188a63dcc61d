"""Image grids and PNG files for people to look at."""

import pathlib

import numpy as np
from PIL import Image

from sbmae import faults


def to_uint8(images):
  """float images in [0, 1] (any leading shape, last axis 1 or 3) -> uint8 RGB."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


def grid(images, pad=2, pad_value=255):
  """Tiles images [R, C, H, W, ch] into one uint8 [R*(H+pad)+pad, ..., 3] picture."""
  images = to_uint8(images)
  rows, cols, h, w, _ = images.shape
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), pad_value, np.uint8)
  for r in range(rows):
    for c in range(cols):
      y, x = pad + r * (h + pad), pad + c * (w + pad)
      out[y:y + h, x:x + w] = images[r, c]
  return out


def save_png(path, image, scale=1):
  """Writes a uint8 HWC image as PNG (nearest-neighbour upscaled by `scale`)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  picture = Image.fromarray(np.asarray(image))
  if scale != 1:
    picture = picture.resize((picture.width * scale, picture.height * scale),
                             Image.Resampling.NEAREST)
  with faults.atomic_write(path) as f:  # the pipeline skips pictures that exist
    picture.save(f, format="PNG")
  return path
