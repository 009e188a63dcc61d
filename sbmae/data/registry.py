"""The data sets the pipeline knows, by `config.data.name`.

A data set gives its splits as dicts of arrays, name -> [N, ...], one entry
per modality plus "label" where there is one: uint8 images (scaled to [0, 1]
by `input_pipeline.as_float`), bool for binary modalities (to {0, 1}). It also says
its modalities and whether coherence needs the digit classifier stage.
"""

import dataclasses
from typing import Callable

from sbmae import errors
from sbmae.data import celeba
from sbmae.data import modalities
from sbmae.data import input_pipeline
from sbmae.data import polymnist


def _polymnist_splits(data_config, cache_dir, seed):
  """PolyMNIST splits (built once, cached), first `num_train` / `num_test` tuples."""
  splits = polymnist.load(data_config, cache_dir, seed)
  return {"train": input_pipeline.modality_arrays(splits["train"].take(data_config.num_train)),
          "test": input_pipeline.modality_arrays(splits["test"].take(data_config.num_test))}


def _celeba_splits(data_config, cache_dir, seed):
  """CelebAMask-HQ splits (read once from `data.path`, cached).

  The reader gives the binary modalities (mask, attrs) as uint8 {0, 1}; they
  become bool here, which `input_pipeline.as_float` maps to {0, 1}. The image number
  ("index") is not a modality and is dropped.
  """
  del seed  # nothing random in reading the release.
  if not data_config.path and not celeba.cache_path(cache_dir, data_config.image_size).exists():
    raise celeba.CelebANotFoundError(
        f"config.data.path is empty and there is no cache in {cache_dir}. {celeba.HOW_TO_GET}")
  splits = celeba.load_celeba(data_config.path, data_config.image_size, cache_dir,
                              num_test=data_config.test_split_size)
  arrays = {}
  for split, num in (("train", data_config.num_train), ("test", data_config.num_test)):
    keep = slice(None) if num < 0 else slice(num)
    arrays[split] = {n: splits[split][n][keep] for n in celeba.MODALITIES}
    for n in ("mask", "attrs"):
      arrays[split][n] = arrays[split][n].astype(bool)
  return arrays


@dataclasses.dataclass(frozen=True)
class DataSet:
  """One data set.

  Attributes:
    load: (data_config, cache_dir, seed) -> {"train": arrays, "test": arrays}.
    modalities: data_config -> tuple of `Modality`, in latent order.
    needs_classifier: evaluation scores coherence with the digit classifiers.
  """
  load: Callable
  modalities: Callable
  needs_classifier: bool


DATASETS = {
    "polymnist": DataSet(_polymnist_splits,
                         lambda c: modalities.polymnist(c.num_modalities), True),
    "celeba": DataSet(_celeba_splits, lambda c: modalities.celeba(c.image_size), False),
}


def get(data_config):
  """The `DataSet` named by `config.data.name`; ConfigError naming the choices."""
  if data_config.name not in DATASETS:
    raise errors.ConfigError(f"config.data.name={data_config.name!r}: expected one of "
                     f"{sorted(DATASETS)}")
  return DATASETS[data_config.name]
