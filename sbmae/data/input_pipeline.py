"""grain input pipelines over in-memory multimodal arrays.

Batches are dicts `{"m0": float32[B, ...] in [0, 1], ..., "label": int32[B]}`
(any modality names; uint8 arrays are scaled to [0, 1], other dtypes pass as
float32). Indices are shuffled per epoch from a seed, batched, and gathered
with one vectorised take per batch, so the pipeline is random access: batch
`step` of a given seed is always the same, which is what makes a resumed run
bit-identical without saving iterator state.
"""

import sys

import grain
from grain.experimental import index_shuffle
import jax
import numpy as np


def as_float(array):
  """uint8 -> float32 in [0, 1]; anything else -> float32 as is."""
  if array.dtype == np.uint8:
    return array.astype(np.float32) * np.float32(1.0 / 255.0)
  return array.astype(np.float32)


def modality_arrays(split, names=None):
  """Dict name -> array from a PolyMNIST `Split` (modalities m0..m{M-1})."""
  names = names or [f"m{k}" for k in range(split.num_modalities)]
  arrays = {name: split.images[:, k] for k, name in enumerate(names)}
  arrays["label"] = split.labels
  return arrays


class _Batch:
  """Batch index -> the batch: its rows (`_Positions`) taken from the arrays."""

  def __init__(self, arrays, positions):
    self._arrays = arrays
    self._positions = positions

  def __call__(self, i):
    idx = np.sort(self._positions(i))  # sorted takes are cache-friendlier; order is still random.
    return {k: (v[idx].astype(np.int32) if k == "label" else as_float(v[idx]))
            for k, v in self._arrays.items()}


def _shuffle_seed(seed):
  """The index-shuffle seed of epoch 0 for pipeline seed `seed`.

  The one `grain.MapDataset.seed(seed).shuffle()` derives (numpy's
  SeedSequence of the seed and the shuffle's depth below `seed`, 1), so the
  data order is grain's: `tests/test_data_polymnist.py` checks it batch for
  batch against that grain pipeline.
  """
  return int(np.random.SeedSequence([seed, 1]).generate_state(1, dtype=np.uint32)[0])


class _Positions:
  """Batch `i` -> the array rows it holds: the shard's rows, shuffled per epoch.

  Epoch e's order is grain's index shuffle (`grain.experimental.index_shuffle`,
  4 rounds, seed `_shuffle_seed(seed) + e`) of the shard's n rows, computed for
  the whole epoch at once and kept for the next batches. grain's
  `MapDataset.shuffle().repeat().batch()` computes it element by element for
  every batch: 7.4 ms per batch of 256 against 2.0 ms here on a 2-core machine,
  whose `cpu` prior then trains at 46.4 instead of 52.7 ms per step
  (docs/speed.md, "The input pipeline").
  """

  def __init__(self, n, batch_size, *, seed, shuffle, repeat, shard_index, shard_count,
               drop_remainder):
    self._rows = np.arange(shard_index, n, shard_count)
    self._batch_size = batch_size
    self._seed = _shuffle_seed(seed) if shuffle else None
    self._repeat = repeat
    self._drop_remainder = drop_remainder
    self._epochs = {}  # epoch -> that epoch's row order; the last two are kept.

  def __len__(self):
    if self._repeat:  # grain's length of a repeated, batched dataset
      return sys.maxsize // self._batch_size
    n, b = len(self._rows), self._batch_size
    return n // b if self._drop_remainder else -(-n // b)

  def _order(self, epoch):
    if self._seed is None:
      return self._rows
    if epoch not in self._epochs:
      n, seed = len(self._rows), (self._seed + epoch) % 2**32
      perm = np.fromiter((index_shuffle(j, max_index=n - 1, seed=seed, rounds=4)
                          for j in range(n)), np.int64, n)
      self._epochs = {e: o for e, o in self._epochs.items() if e == epoch - 1}
      self._epochs[epoch] = self._rows[perm]
    return self._epochs[epoch]

  def __call__(self, i):
    n = len(self._rows)
    start = i * self._batch_size
    stop = start + self._batch_size if self._repeat else min(start + self._batch_size, n)
    pos = np.arange(start, stop)
    epochs, within = np.divmod(pos, n)
    out = np.empty(len(pos), np.int64)
    for e in np.unique(epochs):  # one epoch, or two where the batch straddles them
      out[epochs == e] = self._order(int(e))[within[epochs == e]]
    return out


def dataset(arrays, batch_size, *, seed, shuffle=True, repeat=True,
            shard_index=None, shard_count=None, drop_remainder=True):
  """A random-access grain dataset of batches.

  Args:
    arrays: dict name -> array with a common leading size N.
    batch_size: per-host batch size.
    seed: shuffle seed (epoch e is shuffled with a key derived from it).
    shuffle: shuffle per epoch.
    repeat: repeat forever (training); else one pass.
    shard_index: this host's shard (default `jax.process_index()`).
    shard_count: number of shards (default `jax.process_count()`).
    drop_remainder: drop the last incomplete batch.

  Returns:
    grain.MapDataset whose element `i` is batch `i`: the batches of
    `grain.MapDataset.range(N)[shard_index::shard_count].seed(seed).shuffle()
    .repeat().batch(batch_size)` (without the shuffle / repeat where those are
    off), gathered from `arrays`.
  """
  n = len(next(iter(arrays.values())))
  if any(len(v) != n for v in arrays.values()):
    raise ValueError(f"arrays have unequal lengths: { {k: len(v) for k, v in arrays.items()} }")
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  positions = _Positions(n, batch_size, seed=seed, shuffle=shuffle, repeat=repeat,
                         shard_index=shard_index, shard_count=shard_count,
                         drop_remainder=drop_remainder)
  return grain.MapDataset.range(len(positions)).map(_Batch(arrays, positions))


def batches(arrays, batch_size, *, seed, start_step=0, **kwargs):
  """Iterator over training batches starting at `start_step` (for resuming)."""
  ds = dataset(arrays, batch_size, seed=seed, **kwargs)
  step = start_step
  while True:
    yield ds[step]
    step += 1


def eval_batches(arrays, batch_size):
  """One ordered pass over all examples, the last batch possibly smaller."""
  ds = dataset(arrays, batch_size, seed=0, shuffle=False, repeat=False,
               shard_index=0, shard_count=1, drop_remainder=False)
  for i in range(len(ds)):
    yield ds[i]
