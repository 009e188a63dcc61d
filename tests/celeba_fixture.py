"""A tiny CelebAMask-HQ in the exact raw layout of the official release.

Random smooth photos (JPEG), random rectangular part masks (PNG, 0/255, mode L)
and random +-1 attributes under a header whose 40 names are shuffled, so a
reader that takes columns by position instead of by name gets them wrong.
Pixel sizes are small for speed; a reader must resize whatever it finds.
"""

import pathlib

import numpy as np
from PIL import Image

from sbmae.data import celeba

# The 40 CelebA attributes in the release's order.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes",
    "Bald", "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair",
    "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young")


def _smooth_image(rng, px):
  low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(low).resize((px, px),
                                                 Image.Resampling.BICUBIC))
  noise = rng.integers(-10, 11, image.shape)
  return np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def _rectangle(rng, px, lo, hi):
  """A random axis-aligned rectangle covering [lo, hi) of the side."""
  mask = np.zeros((px, px), bool)
  h, w = rng.integers(int(lo * px), max(int(hi * px), int(lo * px) + 1), 2)
  top, left = rng.integers(0, px - h + 1), rng.integers(0, px - w + 1)
  mask[top:top + h, left:left + w] = True
  return mask


def write_fixture(root, n=40, seed=0, image_px=64, mask_px=32,
                  folder_size=2000, shuffle_header=True):
  """Writes a random data set in the raw CelebAMask-HQ layout under `root`.

  Every image gets a `skin` mask (a large rectangle) and each other part with
  probability 1/2 (small rectangles), so images with skin only occur and
  pixels covered by skin alone are common.

  Args:
    root: folder to write into (created).
    n: number of images, numbered 0..n-1.
    seed: seed of everything random.
    image_px: side of the square JPEG photos.
    mask_px: side of the square PNG part masks.
    folder_size: images per mask folder (the release uses 2000); smaller
      values spread the masks over several folders.
    shuffle_header: shuffle the 40 attribute names (and their columns).

  Returns:
    Dict: header (the 40 names as written), values int[n, 40] (+-1, header
    order), attrs uint8[n, 18] (expected, `celeba.ATTRIBUTES` order), union
    bool[n, mask_px, mask_px] (the non-skin parts written), skin bool[n,
    mask_px, mask_px], parts (per image, the part names written).
  """
  rng = np.random.default_rng(seed)
  root = pathlib.Path(root)
  image_dir = root / celeba.IMAGE_DIR
  image_dir.mkdir(parents=True)
  header = list(CELEBA_ATTRIBUTES)
  if shuffle_header:
    header = [header[k] for k in rng.permutation(len(header))]
  values = rng.choice([-1, 1], (n, len(header)))
  union = np.zeros((n, mask_px, mask_px), bool)
  skin = np.zeros((n, mask_px, mask_px), bool)
  parts = []
  for i in range(n):
    Image.fromarray(_smooth_image(rng, image_px)).save(
        image_dir / f"{i}.jpg", quality=95)
    folder = root / celeba.MASK_DIR / str(i // folder_size)
    folder.mkdir(parents=True, exist_ok=True)
    written = ["skin"] + [p for p in celeba.PARTS[1:] if rng.random() < 0.5]
    for part in written:
      if part == "skin":
        mask = skin[i] = _rectangle(rng, mask_px, 0.6, 0.9)
      else:
        mask = _rectangle(rng, mask_px, 0.1, 0.3)
        union[i] |= mask
      Image.fromarray(mask.astype(np.uint8) * 255).save(
          folder / f"{i:05d}_{part}.png")
    parts.append(written)
  lines = [str(n), " ".join(header)]
  # Values right-aligned in width 2 like the release ("0.jpg  1 -1  1 ...").
  lines += [f"{i}.jpg " + " ".join(f"{v:2d}" for v in values[i])
            for i in range(n)]
  (root / celeba.ATTRIBUTE_FILE).write_text("\n".join(lines) + "\n")
  columns = [header.index(a) for a in celeba.ATTRIBUTES]
  return {"header": header, "values": values,
          "attrs": (values[:, columns] == 1).astype(np.uint8),
          "union": union, "skin": skin, "parts": parts}
