"""Metric writing: TensorBoard event files and JSON, from process 0 only."""

import json

import jax
import numpy as np

from sbmae import faults


class Writer:
  """Writes scalars to TensorBoard event files and JSON summaries to files.

  On every process but 0 all methods do nothing, so callers need no checks.
  """

  def __init__(self, tb_dir):
    """Events go to `tb_dir` (a run's `RunDir.tensorboard`)."""
    self._active = jax.process_index() == 0
    self._tb = None
    if self._active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(tb_dir))

  def scalars(self, step, values, prefix=""):
    """Logs a dict of scalars at `step` under `prefix/`."""
    if not self._active:
      return
    for k, v in values.items():
      self._tb.add_scalar(f"{prefix}/{k}" if prefix else k, float(v), step)
    self._tb.flush()

  def json(self, path, payload):
    """Writes `payload` to `path` as indented JSON (atomically)."""
    if not self._active:
      return
    faults.write_text(path, json.dumps(payload, indent=2, sort_keys=True,
                                       default=_to_builtin))

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _to_builtin(value):
  if isinstance(value, (np.generic, jax.Array)):
    return np.asarray(value).tolist()
  raise TypeError(f"cannot serialise {type(value)}")
