"""Tests for the MNIST sources, the PolyMNIST builder/reader/cache and the pipeline."""

import gzip
import hashlib
import pathlib

import grain
import numpy as np
from PIL import Image
import pytest

from configs import default
from sbmae.data import mnist
from sbmae.data import input_pipeline
from sbmae.data import polymnist

SHARED_MNIST = pathlib.Path(__file__).resolve().parents[1] / "../shared/data/mnist.npz"
needs_mnist = pytest.mark.skipif(not SHARED_MNIST.exists(),
                                 reason=f"real MNIST not found at {SHARED_MNIST}")


@pytest.fixture(scope="module")
def real_mnist():
  if not SHARED_MNIST.exists():
    pytest.skip(f"real MNIST not found at {SHARED_MNIST}")
  return mnist.load_mnist(str(SHARED_MNIST))


def _small(digits, n_train=600, n_test=200):
  return {"x_train": digits["x_train"][:n_train], "y_train": digits["y_train"][:n_train],
          "x_test": digits["x_test"][:n_test], "y_test": digits["y_test"][:n_test]}


def _solid_backgrounds(folder, colours):
  folder.mkdir(parents=True, exist_ok=True)
  for k, c in enumerate(colours):
    Image.fromarray(np.full((40, 50, 3), c, np.uint8)).save(folder / f"{k:02d}.png")
  return folder


def _data_config(**overrides):
  config = default.get_config().data
  config.update(num_modalities=3, digits="mnist", mnist_path=str(SHARED_MNIST), **overrides)
  return config


@needs_mnist
def test_same_seed_gives_identical_bytes(real_mnist):
  digits = _small(real_mnist)
  backgrounds = polymnist.load_backgrounds("builtin", 5)
  a = polymnist.build(digits, backgrounds, seed=3)
  b = polymnist.build(digits, backgrounds, seed=3)
  c = polymnist.build(digits, backgrounds, seed=4)
  digest = lambda s: hashlib.sha256(
      s["train"].images.tobytes() + s["test"].images.tobytes()).hexdigest()
  assert digest(a) == digest(b)
  assert digest(a) != digest(c)


@needs_mnist
def test_tuples_are_distinct_mnist_images_of_their_label(real_mnist):
  digits = _small(real_mnist, n_train=2000)
  split = polymnist.build_split(digits["x_train"], digits["y_train"],
                                polymnist.load_backgrounds("builtin", 10), seed=0)
  idx = split.source_index
  assert idx.shape == (2000, 10)
  # Every modality shows an MNIST image of the tuple's label ...
  np.testing.assert_array_equal(digits["y_train"][idx], split.labels[:, None].repeat(10, 1))
  # ... and the M images of a tuple are M different MNIST images.
  assert all(len(set(row)) == 10 for row in idx)
  # Within a modality no MNIST image is used twice.
  for k in range(10):
    assert len(np.unique(idx[:, k])) == len(idx)


@needs_mnist
def test_modality_k_lies_on_background_k(real_mnist, tmp_path):
  colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (120, 120, 30)]
  backgrounds = polymnist.load_backgrounds(str(_solid_backgrounds(tmp_path / "bg", colours)), 4)
  digits = _small(real_mnist, n_train=300)
  split = polymnist.build_split(digits["x_train"], digits["y_train"], backgrounds, seed=1)
  for k, c in enumerate(colours):
    c = np.array(c, np.uint8)
    stroke = digits["x_train"][split.source_index[:, k]] > 128
    expected = np.where(stroke[..., None], 255 - c, c)
    np.testing.assert_array_equal(split.images[:, k], expected)


def test_builtin_background_crops_come_from_that_background():
  backgrounds = polymnist.load_backgrounds("builtin", 5)
  rng = np.random.default_rng(0)
  digits = np.zeros((4, 28, 28), np.uint8)  # no strokes: the image is the crop.
  for k, bg in enumerate(backgrounds):
    images, corners = polymnist.paste_on_background(digits, bg, rng)
    for image, (r, c) in zip(images, corners):
      np.testing.assert_array_equal(image, bg[r:r + 28, c:c + 28])
      # The crop is not found at the same place in any other background.
      for j, other in enumerate(backgrounds):
        if j != k and other.shape[0] > r + 27 and other.shape[1] > c + 27:
          assert not np.array_equal(image, other[r:r + 28, c:c + 28])


def test_released_layout_round_trips(tmp_path):
  rng = np.random.default_rng(0)
  splits = {s: polymnist.Split(rng.integers(0, 256, (n, 3, 28, 28, 3), dtype=np.uint8),
                               rng.integers(0, 10, n).astype(np.int32),
                               np.full((n, 3), -1, np.int32))
            for s, n in (("train", 12), ("test", 5))}
  polymnist.write_released(splits, tmp_path)
  assert (tmp_path / "train" / "m2" / f"3.{splits['train'].labels[3]}.png").exists()
  back = polymnist.read_released(tmp_path, 3)
  for s in splits:
    np.testing.assert_array_equal(back[s].images, splits[s].images)
    np.testing.assert_array_equal(back[s].labels, splits[s].labels)


def _released_fixture(root, n=4, m=3):
  rng = np.random.default_rng(1)
  for split in ("train", "test"):
    for k in range(m):
      folder = root / split / f"m{k}"
      folder.mkdir(parents=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(
            folder / f"{i}.{i % 10}.png")
  return root


def test_released_missing_modality(tmp_path):
  root = _released_fixture(tmp_path)
  with pytest.raises(polymnist.PolyMnistError, match=r"missing modality folder .*train/m3"):
    polymnist.read_released(root, 4)


def test_released_unequal_counts(tmp_path):
  root = _released_fixture(tmp_path)
  (root / "test" / "m1" / "3.3.png").unlink()
  with pytest.raises(polymnist.PolyMnistError, match=r"unequal file counts per modality \[4, 3, 4\]"):
    polymnist.read_released(root, 3)


def test_released_unreadable_file_is_named(tmp_path):
  root = _released_fixture(tmp_path)
  bad = root / "train" / "m2" / "1.1.png"
  bad.write_bytes(b"not a png")
  with pytest.raises(polymnist.PolyMnistError, match=f"cannot read {bad}"):
    polymnist.read_released(root, 3)


def test_released_bad_name_and_label_mismatch(tmp_path):
  root = _released_fixture(tmp_path)
  (root / "train" / "m1" / "2.2.png").rename(root / "train" / "m1" / "2.7.png")
  with pytest.raises(polymnist.PolyMnistError, match=r"train/m1: label of index 2 differs"):
    polymnist.read_released(root, 3)
  (root / "train" / "m1" / "notes.txt").write_text("x")
  with pytest.raises(polymnist.PolyMnistError, match=r"unexpected file .*notes.txt"):
    polymnist.read_released(root, 3)


def test_missing_mnist_lists_where_it_looked(tmp_path, monkeypatch):
  monkeypatch.delenv(mnist.ENV_VAR, raising=False)
  with pytest.raises(mnist.MnistNotFoundError, match="does not exist.*SBMAE_MNIST"):
    mnist.load_mnist(str(tmp_path / "nowhere.npz"))
  with pytest.raises(mnist.MnistNotFoundError, match="missing train-images-idx3-ubyte"):
    mnist.load_mnist(str(tmp_path))
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(mnist, "_from_tfds", lambda: (_ for _ in ()).throw(OSError("offline")))
  with pytest.raises(mnist.MnistNotFoundError,
                     match=r"No MNIST found\. Looked in: \$SBMAE_MNIST.*elsewhere\.npz"):
    mnist.load_mnist(search=("elsewhere.npz",))


def test_idx_files_gz_and_plain_read_like_npz(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"x_train": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
            "y_train": rng.integers(0, 10, 7).astype(np.uint8),
            "x_test": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
            "y_test": rng.integers(0, 10, 3).astype(np.uint8)}
  for i, (key, name) in enumerate(mnist._IDX_NAMES.items()):  # pylint: disable=protected-access
    a = arrays[key]
    header = (0x0800 | a.ndim).to_bytes(4, "big") + b"".join(
        d.to_bytes(4, "big") for d in a.shape)
    data = header + a.tobytes()
    if i % 2:
      (tmp_path / (name + ".gz")).write_bytes(gzip.compress(data))
    else:
      (tmp_path / name).write_bytes(data)
  loaded = mnist.load_mnist(str(tmp_path))
  np.savez(tmp_path / "m.npz", **arrays)
  from_npz = mnist.load_mnist(str(tmp_path / "m.npz"))
  for key in arrays:
    np.testing.assert_array_equal(loaded[key], arrays[key])
    np.testing.assert_array_equal(from_npz[key], arrays[key])


def test_bad_background_inputs(tmp_path):
  with pytest.raises(polymnist.PolyMnistError, match="background folder .*nope does not exist"):
    polymnist.load_backgrounds(str(tmp_path / "nope"), 2)
  _solid_backgrounds(tmp_path / "bg", [(0, 0, 0)])
  with pytest.raises(polymnist.PolyMnistError, match="has 1 images; need 2"):
    polymnist.load_backgrounds(str(tmp_path / "bg"), 2)
  with pytest.raises(polymnist.PolyMnistError, match="only 10 built-in backgrounds"):
    polymnist.load_backgrounds("builtin", 11)


@needs_mnist
def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
  config = _data_config()
  first = polymnist.load(config, tmp_path, seed=0)
  files = list(tmp_path.glob("polymnist3_*.npz"))
  assert len(files) == 1
  monkeypatch.setattr(polymnist, "build", lambda *a: pytest.fail("rebuilt despite cache"))
  second = polymnist.load(config, tmp_path, seed=0)
  np.testing.assert_array_equal(first["test"].images, second["test"].images)
  assert first["train"].images.shape == (60000, 3, 28, 28, 3)


@pytest.mark.parametrize("batch_size,seed,shard,shuffle,repeat,drop", [
    (64, 0, (0, 1), True, True, True),    # batches straddle epochs (1,000 rows)
    (37, 5, (1, 3), True, True, True),    # a shard
    (300, 3, (0, 2), True, False, False),  # one pass, last batch short
    (300, 3, (0, 1), True, False, True),
    (100, 0, (0, 1), False, False, False),  # the evaluation's ordered pass
])
def test_pipeline_order_is_grains(batch_size, seed, shard, shuffle, repeat, drop):
  # The per-epoch index permutation must give the batches of the grain pipeline
  # it replaced (and that earlier runs used), batch for batch.
  n = 1000
  arrays = {"m0": np.arange(n, dtype=np.uint8)[:, None], "label": np.arange(n, dtype=np.int32)}
  ref = grain.MapDataset.range(n)[shard[0]::shard[1]]
  ref = ref.seed(seed).shuffle() if shuffle else ref
  ref = (ref.repeat() if repeat else ref).batch(batch_size, drop_remainder=drop)
  ds = input_pipeline.dataset(arrays, batch_size, seed=seed, shuffle=shuffle, repeat=repeat,
                              shard_index=shard[0], shard_count=shard[1], drop_remainder=drop)
  assert len(ds) == len(ref)
  for i in range(60 if repeat else len(ref)):
    np.testing.assert_array_equal(ds[i]["label"], np.sort(np.asarray(ref[i])), err_msg=f"batch {i}")


def test_pipeline_batches_shuffle_shard_and_resume():
  arrays = {"m0": np.arange(20 * 2, dtype=np.uint8).reshape(20, 2),
            "label": np.arange(20, dtype=np.int32)}
  ds = input_pipeline.dataset(arrays, 4, seed=0, shard_index=0, shard_count=1)
  epoch = np.concatenate([ds[i]["label"] for i in range(5)])
  assert sorted(epoch) == list(range(20))  # one epoch sees every example once
  assert not np.array_equal(epoch, np.arange(20))
  next_epoch = np.concatenate([ds[i]["label"] for i in range(5, 10)])
  assert not np.array_equal(epoch, next_epoch)  # reshuffled per epoch
  batch = ds[2]
  assert batch["m0"].dtype == np.float32 and batch["m0"].max() <= 1.0
  np.testing.assert_allclose(batch["m0"] * 255, arrays["m0"][batch["label"]], atol=1e-4)
  resumed = input_pipeline.batches(arrays, 4, seed=0, start_step=7, shard_index=0, shard_count=1)
  np.testing.assert_array_equal(next(resumed)["label"], ds[7]["label"])
  shards = [np.concatenate([input_pipeline.dataset(arrays, 5, seed=0, shard_index=s, shard_count=2)[i]["label"]
                            for i in range(2)]) for s in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(range(20))
