"""Sheets of CelebAMask-HQ tuples for people to look at: image, mask, attribute names.

Used for the data examples and the evaluation pictures; green/red attribute
names mark right/wrong predictions when the truth is shown beside them.
"""

import pathlib

import numpy as np
from PIL import Image
from PIL import ImageDraw

from sbmae import images
from sbmae.data import celeba
from sbmae.data import input_pipeline

IMAGE, MASK, ATTRS = celeba.MODALITIES
THRESHOLD = 0.5  # attributes with p > THRESHOLD are shown as on (as scored).


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
  """PNG of the first `num` tuples of data arrays (uint8 image, bool mask and attrs)."""
  data = {k: input_pipeline.as_float(np.asarray(arrays[k][:num])) for k in celeba.MODALITIES}
  return save_sheet(path, data, title="CelebAMask-HQ training tuples", name="data")
