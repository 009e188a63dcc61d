"""grain input pipelines over in-memory multimodal arrays.

Batches are dicts `{"m0": float32[B, ...] in [0, 1], ..., "label": int32[B]}`
(any modality names; uint8 arrays are scaled to [0, 1], other dtypes pass as
float32). Indices are shuffled per epoch from a seed, batched, and gathered
with one vectorised take per batch, so the pipeline is random access: batch
`step` of a given seed is always the same, which is what makes a resumed run
bit-identical without saving iterator state.
"""

import grain
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


class _Gather:
  """Maps a batch of indices to a batch of examples."""

  def __init__(self, arrays):
    self._arrays = arrays

  def __call__(self, idx):
    idx = np.sort(idx)  # sorted takes are cache-friendlier; order is still random.
    return {k: (v[idx].astype(np.int32) if k == "label" else as_float(v[idx]))
            for k, v in self._arrays.items()}


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
    grain.MapDataset whose element `i` is batch `i`.
  """
  n = len(next(iter(arrays.values())))
  if any(len(v) != n for v in arrays.values()):
    raise ValueError(f"arrays have unequal lengths: { {k: len(v) for k, v in arrays.items()} }")
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  ds = grain.MapDataset.range(n)[shard_index::shard_count]
  if shuffle:
    ds = ds.seed(seed).shuffle()
  if repeat:
    ds = ds.repeat()
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.map(_Gather(arrays))


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
