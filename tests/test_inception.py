"""FID InceptionV3: weight-file naming and loading, layout, folding, features.

No real weights exist offline, so a state dict of random weights with the
torchvision shapes is written in the real file format (.npz of the pytorch-fid
state-dict keys). The network is checked against an independent forward pass
written in torch's own conventions (NCHW activations, OIHW kernels, unfolded
BatchNorm, pytorch-fid's FID blocks) straight from that state dict.
"""

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from sbmae.eval import frechet
from sbmae.eval import inception

HIGHEST = lax.Precision.HIGHEST


def _random_state_dict(rng):
  """Random weights with `expected_shapes()`; He-scaled so activations stay O(1)."""
  state = {}
  for key, shape in inception.expected_shapes().items():
    if key.endswith("conv.weight"):
      fan_in = np.prod(shape[1:])
      value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith("bn.weight"):
      value = rng.uniform(0.5, 1.5, size=shape)
    elif key.endswith("bn.running_var"):
      value = rng.uniform(0.5, 2.0, size=shape)
    else:  # bn.bias, bn.running_mean
      value = rng.normal(size=shape) * 0.1
    state[key] = value.astype(np.float32)
  return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """(path, state dict) of a random-weight file as the docstring recipe makes it."""
  state = _random_state_dict(np.random.default_rng(0))
  extras = {  # present in pytorch-fid's .pth; must be ignored
      "fc.weight": np.zeros((1008, 2048), np.float32),
      "fc.bias": np.zeros((1008,), np.float32),
      "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(0, np.int64),
  }
  path = tmp_path_factory.mktemp("inception") / "pt_inception.npz"
  np.savez(path, **state, **extras)
  return path, state


def test_key_names_and_shapes_match_torchvision():
  shapes = inception.expected_shapes()
  known = {  # torchvision.models.inception_v3 state-dict entries
      "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
      "Conv2d_2b_3x3.bn.running_var": (64,),
      "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
      "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
      "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
      "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
      "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
      "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
      "Mixed_7a.branch7x7x3_3.conv.weight": (192, 192, 7, 1),
      "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
      "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
      "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
      "Mixed_7c.branch_pool.bn.bias": (192,),
  }
  for key, shape in known.items():
    assert shapes[key] == shape, key
  assert len(shapes) == 94 * 5  # 94 BasicConv2d layers, conv.weight + 4 bn entries each
  # torchvision's published inception_v3 size is 27,161,264 parameters; minus
  # AuxLogits (conv0 768->128 1x1, conv1 128->768 5x5, fc 768->1000, with BN
  # affine) and fc (2048->1000) leaves exactly the pool3 network.
  aux = 128 * 768 + 2 * 128 + 768 * 128 * 25 + 2 * 768 + 768 * 1000 + 1000
  trainable = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(("_mean", "_var")))
  assert trainable == 27_161_264 - aux - (2048 * 1000 + 1000)


def test_bad_files_name_the_key(weights, tmp_path):
  _, state = weights
  missing = dict(state)
  del missing["Mixed_6c.branch7x7dbl_3.bn.running_var"]
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(ValueError, match=r"missing\.npz.*Mixed_6c\.branch7x7dbl_3\.bn\.running_var"):
    inception.load_params(tmp_path / "missing.npz")
  wrong = dict(state)
  wrong["Mixed_7b.branch3x3_2a.conv.weight"] = np.zeros((384, 384, 3, 1), np.float32)  # transposed
  np.savez(tmp_path / "wrong.npz", **wrong)
  pattern = r"wrong\.npz.*Mixed_7b\.branch3x3_2a\.conv\.weight.*\(384, 384, 1, 3\)"
  with pytest.raises(ValueError, match=pattern):
    inception.load_params(tmp_path / "wrong.npz")


def _torch_conv(x, weight, stride, padding):
  """torch.nn.Conv2d (no bias): NCHW input, OIHW kernel."""
  (ph, pw) = (padding, padding) if isinstance(padding, int) else padding
  return lax.conv_general_dilated(x, weight, (stride, stride), [(ph, ph), (pw, pw)],
                                  dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=HIGHEST)


def _torch_bn(y, state, prefix, eps=1e-3):
  """torch.nn.BatchNorm2d in eval mode, by its formula."""
  bn = lambda k: state[f"{prefix}.bn.{k}"][None, :, None, None]
  return (y - bn("running_mean")) / jnp.sqrt(bn("running_var") + eps) * bn("weight") + bn("bias")


def _flax_conv(x_nchw, kernel, bias, stride, padding):
  (ph, pw) = (padding, padding) if isinstance(padding, int) else padding
  conv = nn.Conv(kernel.shape[-1], kernel.shape[:2], strides=stride, padding=((ph, ph), (pw, pw)),
                 precision=HIGHEST)
  y = conv.apply({"params": {"kernel": kernel, "bias": bias}}, jnp.transpose(x_nchw, (0, 2, 3, 1)))
  return jnp.transpose(y, (0, 3, 1, 2))


@pytest.mark.parametrize("prefix,stride,padding", [
    ("Conv2d_1a_3x3", 2, 0),
    ("Mixed_6b.branch7x7_2", 1, (0, 3)),   # 1x7: catches an H/W swap
    ("Mixed_7c.branch3x3_2b", 2, (1, 0)),  # 3x1, strided
])
def test_conv_layout_matches_torch(weights, prefix, stride, padding):
  _, state = weights
  w = state[f"{prefix}.conv.weight"]
  x = jax.random.normal(jax.random.key(1), (2, w.shape[1], 9, 11))
  # Identity BatchNorm (scale 1, shift 0) isolates the OIHW -> HWIO conversion.
  out = w.shape[0]
  kernel, bias = inception.fold_conv_bn(w, np.ones(out), np.zeros(out), np.zeros(out),
                                        np.full(out, 1 - inception.BN_EPS))
  np.testing.assert_allclose(_flax_conv(x, kernel, bias, stride, padding),
                             _torch_conv(x, w, stride, padding), rtol=1e-5, atol=1e-5)


def test_loaded_layers_fold_batchnorm(weights):
  path, state = weights
  params = inception.load_params(path)
  for prefix, stride, padding in [("Conv2d_2a_3x3", 1, 0), ("Mixed_5d.branch5x5_2", 1, 2)]:
    layer = functools.reduce(lambda tree, k: tree[k], prefix.split("."), params)
    w = state[f"{prefix}.conv.weight"]
    x = jax.random.normal(jax.random.key(2), (2, w.shape[1], 8, 8))
    want = _torch_bn(_torch_conv(x, w, stride, padding), state, prefix)
    got = _flax_conv(x, layer["kernel"], layer["bias"], stride, padding)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert layer["kernel"].dtype == layer["bias"].dtype == np.float32


def _torch_bilinear_1d(n_in, n_out):
  """Interpolation matrix of torch F.interpolate(bilinear, align_corners=False) on one axis."""
  src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(int), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1 - (src - lo))
  np.add.at(m, (np.arange(n_out), hi), src - lo)
  return m


@pytest.mark.parametrize("size_in,size_out", [((5, 7), 12), ((13, 9), 4), ((8, 8), 8)])
def test_preprocess_matches_torch_bilinear(size_in, size_out):
  images = np.random.default_rng(3).uniform(size=(2,) + size_in + (3,))
  want = np.einsum("ih,jw,bhwc->bijc", _torch_bilinear_1d(size_in[0], size_out),
                   _torch_bilinear_1d(size_in[1], size_out), images)
  np.testing.assert_allclose(inception.preprocess(images, size_out), 2 * want - 1, atol=1e-5)
  gray = inception.preprocess(images[..., :1], size_out)
  np.testing.assert_allclose(gray, np.repeat(2 * want[..., :1] - 1, 3, -1), atol=1e-5)


def _reference_pool3(state, x):
  """pytorch-fid's FID InceptionV3 to pool3, torch conventions; x: NCHW in [-1, 1]."""

  def conv(name, x, stride=1, padding=0):
    return jax.nn.relu(_torch_bn(_torch_conv(x, state[f"{name}.conv.weight"], stride, padding),
                                 state, name))

  def max_pool(x, stride, pad=0):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 3, 3), (1, 1, stride, stride),
                             [(0, 0), (0, 0), (pad, pad), (pad, pad)])

  def avg_pool_exclude_pad(x):
    # count_include_pad=False: divide by the number of in-image pixels per window.
    in_image = lambda n: np.minimum(np.arange(n) + 1, n - 1) - np.maximum(np.arange(n) - 1, 0) + 1
    counts = np.outer(in_image(x.shape[2]), in_image(x.shape[3]))
    window_sum = lax.reduce_window(x, 0.0, lax.add, (1, 1, 3, 3), (1, 1, 1, 1),
                                   [(0, 0), (0, 0), (1, 1), (1, 1)])
    return window_sum / counts

  cat = lambda *xs: jnp.concatenate(xs, axis=1)

  def block_a(n, x):
    b5 = conv(f"{n}.branch5x5_2", conv(f"{n}.branch5x5_1", x), padding=2)
    b3 = conv(f"{n}.branch3x3dbl_1", x)
    b3 = conv(f"{n}.branch3x3dbl_3", conv(f"{n}.branch3x3dbl_2", b3, padding=1), padding=1)
    return cat(conv(f"{n}.branch1x1", x), b5, b3,
               conv(f"{n}.branch_pool", avg_pool_exclude_pad(x)))

  def block_b(n, x):
    bd = conv(f"{n}.branch3x3dbl_2", conv(f"{n}.branch3x3dbl_1", x), padding=1)
    return cat(conv(f"{n}.branch3x3", x, stride=2), conv(f"{n}.branch3x3dbl_3", bd, stride=2),
               max_pool(x, 2))

  def block_c(n, x):
    b7 = conv(f"{n}.branch7x7_1", x)
    b7 = conv(f"{n}.branch7x7_2", b7, padding=(0, 3))
    b7 = conv(f"{n}.branch7x7_3", b7, padding=(3, 0))
    bd = conv(f"{n}.branch7x7dbl_1", x)
    for i, pad in zip(range(2, 6), [(3, 0), (0, 3), (3, 0), (0, 3)]):
      bd = conv(f"{n}.branch7x7dbl_{i}", bd, padding=pad)
    return cat(conv(f"{n}.branch1x1", x), b7, bd,
               conv(f"{n}.branch_pool", avg_pool_exclude_pad(x)))

  def block_d(n, x):
    b3 = conv(f"{n}.branch3x3_2", conv(f"{n}.branch3x3_1", x), stride=2)
    b7 = conv(f"{n}.branch7x7x3_1", x)
    b7 = conv(f"{n}.branch7x7x3_2", b7, padding=(0, 3))
    b7 = conv(f"{n}.branch7x7x3_3", b7, padding=(3, 0))
    return cat(b3, conv(f"{n}.branch7x7x3_4", b7, stride=2), max_pool(x, 2))

  def block_e(n, x, pool):
    b3 = conv(f"{n}.branch3x3_1", x)
    b3 = cat(conv(f"{n}.branch3x3_2a", b3, padding=(0, 1)),
             conv(f"{n}.branch3x3_2b", b3, padding=(1, 0)))
    bd = conv(f"{n}.branch3x3dbl_2", conv(f"{n}.branch3x3dbl_1", x), padding=1)
    bd = cat(conv(f"{n}.branch3x3dbl_3a", bd, padding=(0, 1)),
             conv(f"{n}.branch3x3dbl_3b", bd, padding=(1, 0)))
    return cat(conv(f"{n}.branch1x1", x), b3, bd, conv(f"{n}.branch_pool", pool(x)))

  x = conv("Conv2d_1a_3x3", x, stride=2)
  x = conv("Conv2d_2a_3x3", x)
  x = max_pool(conv("Conv2d_2b_3x3", x, padding=1), 2)
  x = conv("Conv2d_4a_3x3", conv("Conv2d_3b_1x1", x))
  x = max_pool(x, 2)
  for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = block_a(n, x)
  x = block_b("Mixed_6a", x)
  for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = block_c(n, x)
  x = block_d("Mixed_7a", x)
  x = block_e("Mixed_7b", x, avg_pool_exclude_pad)
  x = block_e("Mixed_7c", x, lambda v: max_pool(v, 1, pad=1))
  return jnp.mean(x, axis=(2, 3))


def test_features_match_torch_reference(weights):
  path, state = weights
  feature_fn = inception.get_feature_fn(path)
  images = np.random.default_rng(4).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  feats = np.asarray(feature_fn(images))
  assert feats.shape == (2, inception.FEATURE_DIM) and np.all(np.isfinite(feats))
  assert np.all(feats >= 0) and feats.std() > 0  # pool3 averages ReLU outputs
  x = jnp.transpose(inception.preprocess(images), (0, 3, 1, 2))
  want = np.asarray(jax.jit(_reference_pool3)(state, x))
  np.testing.assert_allclose(feats, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_fid_helper_batches_and_converts_uint8():
  rng = np.random.default_rng(5)
  projection = rng.normal(size=(4 * 4 * 3, 6))
  feature_fn = lambda batch: batch.reshape(len(batch), -1) @ projection
  a = rng.integers(0, 256, size=(23, 4, 4, 3), dtype=np.uint8)
  b = rng.uniform(size=(17, 4, 4, 3))
  feats_a = (a / 255.0).reshape(23, -1) @ projection
  np.testing.assert_allclose(inception.features(feature_fn, a, batch_size=10), feats_a,
                             rtol=1e-5, atol=1e-6)
  want = frechet.frechet_distance(*frechet.statistics(feats_a),
                                  *frechet.statistics(b.reshape(17, -1) @ projection))
  np.testing.assert_allclose(inception.fid(feature_fn, a, b, batch_size=8), want, rtol=1e-5)
  assert abs(inception.fid(feature_fn, b, b, batch_size=5)) < 1e-8
