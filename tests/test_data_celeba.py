"""Tests of the CelebAMask-HQ raw reader on fixtures in the release's layout."""

import re
import shutil

import numpy as np
from PIL import Image
import pytest

from sbmae.data import celeba
import celeba_fixture

N, NUM_TEST = 40, 10


def _decoded(root, i):
  """The fixture's photo i as PIL decodes it at full size, float [H, W, 3]."""
  with Image.open(root / celeba.IMAGE_DIR / f"{i}.jpg") as im:
    return np.asarray(im.convert("RGB"), np.float64)


def _area_mean(image, size):
  """Closed-form area downsampling by an integer factor."""
  f = image.shape[0] // size
  return image.reshape(size, f, size, f, -1).mean(axis=(1, 3))


def _nearest(mask, size):
  """PIL's nearest-neighbour resampling, independent of the reader's own."""
  im = Image.fromarray(mask.astype(np.uint8))
  return np.asarray(im.resize((size, size), Image.Resampling.NEAREST))


def _joined(split, key):
  return np.concatenate([split["train"][key], split["test"][key]])


@pytest.fixture(scope="module")
def read(tmp_path_factory):
  """A 40-image fixture (masks over 4 folders) read at 16, 32 and 64 px."""
  root = tmp_path_factory.mktemp("celeba_read")
  truth = celeba_fixture.write_fixture(root, n=N, seed=0, folder_size=10)
  data = {
      16: celeba.read_split(root, 16, num_test=NUM_TEST, num_workers=1),
      32: celeba.read_split(root, 32, num_test=NUM_TEST, num_workers=1),
      # The process pool, and upsampling (the fixture has 64px photos and
      # 32px masks).
      64: celeba.read_split(root, 64, num_test=NUM_TEST, num_workers=2),
  }
  return root, truth, data


@pytest.mark.parametrize("size", [16, 32, 64])
def test_shapes_dtypes_and_split(read, size):
  _, _, data = read
  for name, n in (("train", N - NUM_TEST), ("test", NUM_TEST)):
    split = data[size][name]
    assert split["image"].shape == (n, size, size, 3)
    assert split["mask"].shape == (n, size, size, 1)
    assert split["attrs"].shape == (n, 18)
    assert split["index"].dtype == np.int32
    for key in celeba.MODALITIES:
      assert split[key].dtype == np.uint8
  # The last NUM_TEST images by index are the test split.
  np.testing.assert_array_equal(data[size]["train"]["index"], np.arange(30))
  np.testing.assert_array_equal(data[size]["test"]["index"], np.arange(30, 40))


def test_image_is_area_mean(read):
  root, _, data = read
  image = _joined(data[32], "image").astype(np.float64)
  for i in range(N):
    np.testing.assert_allclose(image[i], _area_mean(_decoded(root, i), 32),
                               atol=1.0, err_msg=f"image {i}")


def test_pool_and_single_process_agree_on_images(read):
  root, _, data = read
  image = _joined(data[64], "image")
  with Image.open(root / celeba.IMAGE_DIR / "7.jpg") as im:
    np.testing.assert_array_equal(image[7], np.asarray(im.convert("RGB")))


@pytest.mark.parametrize("size", [16, 32, 64])
def test_mask_is_nearest_union_of_non_skin_parts(read, size):
  _, truth, data = read
  mask = _joined(data[size], "mask")[..., 0]
  assert set(np.unique(mask)) <= {0, 1}
  skin_only_pixels = 0
  for i in range(N):
    np.testing.assert_array_equal(mask[i], _nearest(truth["union"][i], size),
                                  err_msg=f"image {i}")
    skin_only = _nearest(truth["skin"][i] & ~truth["union"][i], size) > 0
    assert not mask[i][skin_only].any()
    skin_only_pixels += skin_only.sum()
  # Without skin-only pixels the check above could not catch skin leaking in.
  assert skin_only_pixels > 100


def test_mask_parts():
  assert len(celeba.MASK_PARTS) == 17
  assert "skin" not in celeba.MASK_PARTS
  assert {"hair", "neck", "cloth", "eye_g", "hat"} <= set(celeba.MASK_PARTS)


def test_attributes_located_by_name(read):
  _, truth, data = read
  header = truth["header"]
  assert header != list(celeba_fixture.CELEBA_ATTRIBUTES)  # really shuffled
  attrs = _joined(data[16], "attrs")
  np.testing.assert_array_equal(attrs, truth["attrs"])
  assert celeba.ATTRIBUTES[9] == "Male"
  np.testing.assert_array_equal(attrs[:, 9],
                                truth["values"][:, header.index("Male")] == 1)
  np.testing.assert_array_equal(_joined(data[64], "attrs"), attrs)


@pytest.fixture
def small(tmp_path):
  root, cache = tmp_path / "raw", tmp_path / "cache"
  return root, cache, celeba_fixture.write_fixture(root, n=8, seed=1)


def test_cache_written_once_and_reused(small):
  root, cache, truth = small
  first = celeba.load_celeba(root, 16, cache, num_test=3, num_workers=1)
  name = celeba.cache_path(cache, 16).name
  assert "16px" in name
  assert [p.name for p in cache.iterdir()] == [name]
  np.testing.assert_array_equal(_joined(first, "attrs"), truth["attrs"])
  # Without the raw data the cache alone must serve, for any split.
  shutil.rmtree(root)
  again = celeba.load_celeba(root, 16, cache, num_test=3)
  for split in ("train", "test"):
    for key in (*celeba.MODALITIES, "index"):
      np.testing.assert_array_equal(again[split][key], first[split][key])
  other = celeba.load_celeba(root, 16, cache, num_test=5)
  np.testing.assert_array_equal(other["test"]["index"], np.arange(3, 8))
  np.testing.assert_array_equal(other["test"]["attrs"], truth["attrs"][3:])
  # Another size is another cache file, which needs the raw data.
  with pytest.raises(celeba.CelebANotFoundError):
    celeba.load_celeba(root, 32, cache)
  assert [p.name for p in cache.iterdir()] == [name]


def test_skin_only_image_has_empty_mask(small):
  root, _, truth = small
  for path in (root / celeba.MASK_DIR).rglob("00002_*.png"):
    if not path.name.endswith("_skin.png"):
      path.unlink()
  data = celeba.read_split(root, 16, num_test=3, num_workers=1)
  assert truth["union"][2].any()
  assert not data["train"]["mask"][2].any()
  assert data["train"]["mask"][:2].any()


def _drop_masks(root, i):
  for path in (root / celeba.MASK_DIR).rglob(f"{i:05d}_*.png"):
    path.unlink()


def _edit_line(root, lineno, edit):
  path = root / celeba.ATTRIBUTE_FILE
  lines = path.read_text().splitlines()
  lines[lineno - 1] = edit(lines[lineno - 1])
  path.write_text("\n".join(lines) + "\n")


def _corrupt(root, i):
  (root / celeba.IMAGE_DIR / f"{i}.jpg").write_bytes(b"not a jpeg at all")


# corruption of a 6-image fixture, error class, text the message holds,
# whether the message says how to get the data.
BAD_INPUTS = {
    "missing_root": (shutil.rmtree, celeba.CelebANotFoundError,
                     "root folder", True),
    "missing_image_dir": (lambda r: shutil.rmtree(r / celeba.IMAGE_DIR),
                          celeba.CelebANotFoundError, celeba.IMAGE_DIR, True),
    "missing_mask_dir": (lambda r: shutil.rmtree(r / celeba.MASK_DIR),
                         celeba.CelebANotFoundError, celeba.MASK_DIR, True),
    "missing_attribute_file": (lambda r: (r / celeba.ATTRIBUTE_FILE).unlink(),
                               celeba.CelebANotFoundError,
                               celeba.ATTRIBUTE_FILE, True),
    "no_mask_files": (lambda r: _drop_masks(r, 4), celeba.CelebADataError,
                      "4.jpg has no mask file", False),
    "too_few_values": (lambda r: _edit_line(r, 5, lambda s: s[:-3]),
                       celeba.CelebADataError, ":5: 39 values for 40", False),
    "too_many_values": (lambda r: _edit_line(r, 6, lambda s: s + " 1"),
                        celeba.CelebADataError, ":6: 41 values for 40", False),
    "value_not_pm1": (lambda r: _edit_line(r, 4, lambda s: s[:-2] + " 0"),
                      celeba.CelebADataError, ":4: value '0'", False),
    "count_disagrees": (lambda r: _edit_line(r, 1, lambda s: "7"),
                        celeba.CelebADataError,
                        ":1: count line says 7 images", False),
    "missing_required_attribute": (
        lambda r: _edit_line(r, 2, lambda s: s.replace("Smiling", "Smirking")),
        celeba.CelebADataError,
        ":2: header lacks required attribute(s) ['Smiling']", False),
    "missing_image": (lambda r: (r / celeba.IMAGE_DIR / "5.jpg").unlink(),
                      celeba.CelebANotFoundError, "5.jpg", False),
    # The last image, so the others were read before the error.
    "unreadable_image": (lambda r: _corrupt(r, 5), celeba.CelebADataError,
                         "Cannot read image", False),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_and_leaves_no_cache(tmp_path, case):
  corrupt, error, text, how_to = BAD_INPUTS[case]
  root, cache = tmp_path / "raw", tmp_path / "cache"
  celeba_fixture.write_fixture(root, n=6, seed=2)
  corrupt(root)
  with pytest.raises(error) as raised:
    celeba.load_celeba(root, 16, cache, num_test=2, num_workers=1)
  message = str(raised.value)
  assert text in message
  assert str(root) in message
  assert (celeba.HOW_TO_GET in message) == how_to
  assert not cache.exists() or not list(cache.iterdir())


def test_line_errors_name_the_file(tmp_path):
  celeba_fixture.write_fixture(tmp_path, n=4, seed=3)
  _edit_line(tmp_path, 3, lambda s: s.replace(" 1", " 2", 1))
  expected = f"{tmp_path / celeba.ATTRIBUTE_FILE}:3: value '2' is not 1 or -1"
  with pytest.raises(celeba.CelebADataError, match=re.escape(expected)):
    celeba.read_split(tmp_path, 16, num_test=1, num_workers=1)


def test_unreadable_image_through_the_pool(tmp_path):
  celeba_fixture.write_fixture(tmp_path, n=6, seed=4)
  _corrupt(tmp_path, 2)
  expected = f"Cannot read image {tmp_path / celeba.IMAGE_DIR / '2.jpg'}"
  with pytest.raises(celeba.CelebADataError, match=re.escape(expected)):
    celeba.read_split(tmp_path, 16, num_test=2, num_workers=2, progress=False)


@pytest.mark.parametrize("num_test", [0, 4])
def test_num_test_out_of_range(tmp_path, num_test):
  celeba_fixture.write_fixture(tmp_path, n=4, seed=5)
  with pytest.raises(ValueError, match="num_test"):
    celeba.read_split(tmp_path, 16, num_test=num_test, num_workers=1)


def test_reduced_scale_decoding_matches_area_mean(tmp_path):
  # 256px photos at 32px: libjpeg decodes at 1/4 scale, then a 2x area step.
  celeba_fixture.write_fixture(tmp_path, n=3, seed=6, image_px=256)
  image = _joined(celeba.read_split(tmp_path, 32, num_test=1, num_workers=1),
                  "image")
  for i in range(3):
    error = np.abs(image[i] - _area_mean(_decoded(tmp_path, i), 32))
    assert error.mean() < 1.0
    assert error.max() < 8.0
