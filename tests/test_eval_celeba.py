"""Tests of sbmae.eval.celeba and sbmae.eval.sheets: F1s, pixel features, sheets.
"""


import numpy as np
from PIL import Image
import pytest
from sklearn import metrics as sk_metrics

from sbmae.eval import celeba as eval_celeba
from sbmae.eval import sheets


def test_binary_f1_hand_computed():
  pred = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], bool)
  true = np.array([[1, 0, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
  # TP/FP/FN: (1,1,1) -> 2/4; (3,0,0) -> 1; (0,1,1) -> 0; 0/0 -> zero_division;
  # (0,1,0) -> 0.
  np.testing.assert_allclose(eval_celeba.binary_f1(pred, true), [0.5, 1, 0, 0, 0])
  np.testing.assert_allclose(eval_celeba.binary_f1(pred, true, zero_division=1.0),
                             [0.5, 1, 0, 1, 0])


def test_sample_f1_thresholds_strictly_and_averages_over_examples():
  # p = 0.5 is off: row 0 predicts {1} for truth {0, 1}: 2 * 1 / (1 + 2) = 2/3.
  prob = np.array([[0.5, 0.51, 0.2], [0.9, 0.1, 0.7]])
  true = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  # Row 1: predicts {0, 2} for truth {0}: 2 / (2 + 1) = 2/3; mean 2/3.
  assert eval_celeba.sample_f1(prob, true) == pytest.approx(2 / 3)
  # Masks: F1 over each example's pixels, then the mean.
  mask_true = np.zeros((2, 4, 4, 1))
  mask_true[0, :2] = 1.0  # 8 pixels on.
  mask_prob = np.zeros((2, 4, 4, 1))
  mask_prob[0, :1] = 0.9  # 4 of them found, none wrong: 2*4 / (4 + 8) = 2/3.
  mask_true[1, 0, 0] = mask_prob[1, 3, 3] = 1.0  # disjoint: 0.
  assert eval_celeba.sample_f1(mask_prob, mask_true) == pytest.approx(1 / 3)


def test_sample_f1_matches_sklearn_samples_average():
  rng = np.random.default_rng(0)
  prob = rng.random((50, 18))
  true = (rng.random((50, 18)) < 0.2).astype(np.float32)
  true[:3] = 0.0
  prob[:2] = 0.0  # two 0/0 examples.
  expected = sk_metrics.f1_score(true, prob > 0.5, average="samples", zero_division=0.0)
  assert eval_celeba.sample_f1(prob, true) == pytest.approx(expected)


def test_pixel_features_are_block_means():
  x = np.zeros((1, 32, 32, 3))
  x[0, :2, :2, 0] = 1.0  # the first 2x2 block of channel 0.
  x[0, 30:, 30:, 2] = 0.5
  f = eval_celeba.pixel_features(x).reshape(16, 16, 3)
  assert f[0, 0, 0] == 1.0 and f[15, 15, 2] == 0.5
  assert f.sum() == pytest.approx(1.0 + 0.5)
  with pytest.raises(ValueError, match="divisible by 16"):
    eval_celeba.pixel_features(np.zeros((1, 24, 24, 3)))


def test_sheet_marks_wrong_attributes_red(tmp_path):
  truth = {"image": np.zeros((1, 32, 32, 3)), "mask": np.zeros((1, 32, 32, 1)),
           "attrs": np.zeros((1, 18))}
  truth["attrs"][0, 0] = 1.0
  right = dict(truth, attrs=truth["attrs"].copy())
  wrong = dict(truth, attrs=np.roll(truth["attrs"], 1, axis=1))

  def red_pixels(output):
    path = sheets.save_sheet(tmp_path / "sheet.png", output, truth)
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return np.sum((rgb[..., 0] > 150) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80))

  assert red_pixels(right) == 0
  assert red_pixels(wrong) > 0
