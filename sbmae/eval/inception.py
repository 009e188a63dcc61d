"""InceptionV3 pool3 features for FID, loading pytorch-fid's weights.

The network is the "FID Inception" used by the original TF FID code and by
pytorch-fid (`fid_inception_v3`): torchvision's InceptionV3 layout with
pytorch-fid's FIDInceptionA/C/E_1/E_2 blocks, i.e. the 3x3 average pools of
the A, C and first E block exclude the zero padding from the mean, and the
last E block (Mixed_7c) max-pools its pool branch. Features are the 2048-d
global average of Mixed_7c (pytorch-fid's output block 3, "pool3").

Preprocessing follows pytorch-fid's `InceptionV3.forward`: images in [0, 1]
are resized to 299x299 with bilinear interpolation (half-pixel centres, no
antialiasing: `F.interpolate(..., mode="bilinear", align_corners=False)`) and
mapped to [-1, 1]. BatchNorm (eps = 0.001) runs in inference mode and is folded
into the preceding bias-free convolution at load time.

Weight file. InceptionV3 weights cannot be downloaded here, so they load from
a local `.npz` whose keys are the pytorch-fid / torchvision state-dict names
(`Conv2d_1a_3x3.conv.weight` [out, in, kh, kw], `Conv2d_1a_3x3.bn.weight`,
`.bn.bias`, `.bn.running_mean`, `.bn.running_var`, `Mixed_5b.branch1x1...`;
see `expected_shapes()`). Other keys (`fc.*`, `*.num_batches_tracked`,
torchvision's `AuxLogits.*`) are ignored. Make it once, on a machine with
torch and pytorch-fid's weight file
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth):

  import numpy as np
  import torch
  p = "pt_inception-2015-12-05-6726825d.pth"
  state = torch.load(p, map_location="cpu")
  np.savez("pt_inception-2015-12-05.npz", **{k: v.numpy() for k, v in state.items()})

then point `config.eval.inception_path` at the `.npz`.

Usage:
  feature_fn = inception.get_feature_fn(path)  # [B, H, W, 3] in [0, 1] -> [B, 2048]
  score = inception.fid(feature_fn, real, fake, batch_size=100)
"""

import functools

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from sbmae.data import input_pipeline
from sbmae.eval import frechet

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # torchvision BasicConv2d's BatchNorm2d(eps=0.001).
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class _Net(nn.Module):
  """Base with the conv helper shared by the stem and the blocks."""
  precision: jax.lax.Precision | str | None = jax.lax.Precision.HIGHEST

  def conv(self, x, name, features, kernel, stride=1, padding=0):
    """torchvision's BasicConv2d with BatchNorm folded: conv + bias, ReLU."""
    ph, pw = _pair(padding)
    x = nn.Conv(features, _pair(kernel), strides=_pair(stride), padding=((ph, ph), (pw, pw)),
                precision=self.precision, name=name)(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # FID Inception (TF) averages over the window's in-image pixels only
  # (count_include_pad=False), unlike torchvision's InceptionV3.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(_Net):
  """Mixed_5b/c/d (FIDInceptionA)."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv(x, "branch1x1", 64, 1)
    b5 = self.conv(x, "branch5x5_1", 48, 1)
    b5 = self.conv(b5, "branch5x5_2", 64, 5, padding=2)
    b3 = self.conv(x, "branch3x3dbl_1", 64, 1)
    b3 = self.conv(b3, "branch3x3dbl_2", 96, 3, padding=1)
    b3 = self.conv(b3, "branch3x3dbl_3", 96, 3, padding=1)
    bp = self.conv(_avg_pool_3x3(x), "branch_pool", self.pool_features, 1)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Net):
  """Mixed_6a (grid reduction 35 -> 17)."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv(x, "branch3x3", 384, 3, stride=2)
    bd = self.conv(x, "branch3x3dbl_1", 64, 1)
    bd = self.conv(bd, "branch3x3dbl_2", 96, 3, padding=1)
    bd = self.conv(bd, "branch3x3dbl_3", 96, 3, stride=2)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(_Net):
  """Mixed_6b/c/d/e (FIDInceptionC), factorised 7x7 convolutions."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv(x, "branch1x1", 192, 1)
    b7 = self.conv(x, "branch7x7_1", c7, 1)
    b7 = self.conv(b7, "branch7x7_2", c7, (1, 7), padding=(0, 3))
    b7 = self.conv(b7, "branch7x7_3", 192, (7, 1), padding=(3, 0))
    bd = self.conv(x, "branch7x7dbl_1", c7, 1)
    bd = self.conv(bd, "branch7x7dbl_2", c7, (7, 1), padding=(3, 0))
    bd = self.conv(bd, "branch7x7dbl_3", c7, (1, 7), padding=(0, 3))
    bd = self.conv(bd, "branch7x7dbl_4", c7, (7, 1), padding=(3, 0))
    bd = self.conv(bd, "branch7x7dbl_5", 192, (1, 7), padding=(0, 3))
    bp = self.conv(_avg_pool_3x3(x), "branch_pool", 192, 1)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Net):
  """Mixed_7a (grid reduction 17 -> 8)."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv(x, "branch3x3_1", 192, 1)
    b3 = self.conv(b3, "branch3x3_2", 320, 3, stride=2)
    b7 = self.conv(x, "branch7x7x3_1", 192, 1)
    b7 = self.conv(b7, "branch7x7x3_2", 192, (1, 7), padding=(0, 3))
    b7 = self.conv(b7, "branch7x7x3_3", 192, (7, 1), padding=(3, 0))
    b7 = self.conv(b7, "branch7x7x3_4", 192, 3, stride=2)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(_Net):
  """Mixed_7b (FIDInceptionE_1, avg pool) and Mixed_7c (FIDInceptionE_2, max pool)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = self.conv(x, "branch1x1", 320, 1)
    b3 = self.conv(x, "branch3x3_1", 384, 1)
    b3 = jnp.concatenate([
        self.conv(b3, "branch3x3_2a", 384, (1, 3), padding=(0, 1)),
        self.conv(b3, "branch3x3_2b", 384, (3, 1), padding=(1, 0)),
    ], axis=-1)
    bd = self.conv(x, "branch3x3dbl_1", 448, 1)
    bd = self.conv(bd, "branch3x3dbl_2", 384, 3, padding=1)
    bd = jnp.concatenate([
        self.conv(bd, "branch3x3dbl_3a", 384, (1, 3), padding=(0, 1)),
        self.conv(bd, "branch3x3dbl_3b", 384, (3, 1), padding=(1, 0)),
    ], axis=-1)
    if self.max_pool:
      # The TF graph behind FID max-pools here (pytorch-fid keeps the quirk).
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = self.conv(pooled, "branch_pool", 192, 1)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(_Net):
  """FID InceptionV3 up to pool3.

  Call on preprocessed images (see `preprocess`): [B, H, W, 3] in [-1, 1],
  H, W >= 75 (299 for FID). Returns [B, 2048] pool3 features. Submodule names
  mirror the torchvision state dict, so `Mixed_6b.branch7x7_2` holds the
  folded `Mixed_6b.branch7x7_2.{conv,bn}.*` weights.
  """

  @nn.compact
  def __call__(self, x):
    p = self.precision
    x = self.conv(x, "Conv2d_1a_3x3", 32, 3, stride=2)
    x = self.conv(x, "Conv2d_2a_3x3", 32, 3)
    x = self.conv(x, "Conv2d_2b_3x3", 64, 3, padding=1)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = self.conv(x, "Conv2d_3b_1x1", 80, 1)
    x = self.conv(x, "Conv2d_4a_3x3", 192, 3)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = InceptionA(precision=p, pool_features=32, name="Mixed_5b")(x)
    x = InceptionA(precision=p, pool_features=64, name="Mixed_5c")(x)
    x = InceptionA(precision=p, pool_features=64, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    x = InceptionC(precision=p, channels_7x7=128, name="Mixed_6b")(x)
    x = InceptionC(precision=p, channels_7x7=160, name="Mixed_6c")(x)
    x = InceptionC(precision=p, channels_7x7=160, name="Mixed_6d")(x)
    x = InceptionC(precision=p, channels_7x7=192, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = InceptionE(precision=p, max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(precision=p, max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def preprocess(images, size=INPUT_SIZE):
  """Images in [0, 1] -> network input, as pytorch-fid does it.

  Args:
    images: [B, H, W, C] floats in [0, 1], C = 3 (or 1: repeated to RGB).
    size: output height and width.

  Returns:
    [B, size, size, 3] float32 in [-1, 1], bilinearly resized with half-pixel
    centres and no antialiasing (torch `align_corners=False`).
  """
  images = jnp.asarray(images, jnp.float32)
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  if images.shape[1:3] != (size, size):
    images = jax.image.resize(images, (images.shape[0], size, size, 3), method="linear",
                              antialias=False)
  return 2.0 * images - 1.0


@functools.cache
def _layer_shapes():
  """{state-dict prefix: (kh, kw, in, out)} read off the Flax module."""
  shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))
  flat = traverse_util.flatten_dict(shapes["params"])
  return {".".join(path[:-1]): s.shape for path, s in flat.items() if path[-1] == "kernel"}


def expected_shapes():
  """The state-dict keys `load_params` needs, with their torch shapes.

  Returns:
    dict key -> shape tuple: for each of the 94 BasicConv2d layers,
    `<prefix>.conv.weight` (out, in, kh, kw) and `<prefix>.bn.{weight, bias,
    running_mean, running_var}` (out,).
  """
  shapes = {}
  for prefix, (kh, kw, cin, cout) in _layer_shapes().items():
    shapes[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
    for k in _BN_KEYS:
      shapes[f"{prefix}.bn.{k}"] = (cout,)
  return shapes


def fold_conv_bn(weight, gamma, beta, mean, var, eps=BN_EPS):
  """Folds inference BatchNorm into a bias-free torch conv.

  bn(conv(x, W)) = conv(x, W * s) + (beta - mean * s), s = gamma / sqrt(var + eps).

  Args:
    weight: [out, in, kh, kw] torch (OIHW) kernel.
    gamma: [out] BN scale (`bn.weight`).
    beta: [out] BN shift (`bn.bias`).
    mean: [out] `bn.running_mean`.
    var: [out] `bn.running_var`.
    eps: BN epsilon.

  Returns:
    (kernel [kh, kw, in, out] (HWIO, for flax.linen.Conv), bias [out]), float32.
  """
  # In float64 so folding adds no error beyond the final cast.
  scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
  kernel = np.transpose(np.asarray(weight, np.float64), (2, 3, 1, 0)) * scale
  bias = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * scale
  return kernel.astype(np.float32), bias.astype(np.float32)


def load_params(path):
  """Loads a pytorch-fid state dict saved as `.npz` (module docstring).

  Args:
    path: the `.npz` file.

  Returns:
    The `InceptionV3` params tree (use as `model.apply({"params": params}, x)`).

  Raises:
    ValueError: a needed key is missing or has the wrong shape; the message
      names the key and the file.
  """
  expected = expected_shapes()
  with np.load(path) as f:
    present = set(f.files)
    missing = [k for k in expected if k not in present]
    if missing:
      more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
      raise ValueError(f"{path}: missing key '{missing[0]}'{more}; expected the pytorch-fid "
                       "state-dict naming, see sbmae.inception")
    arrays = {}
    for key, shape in expected.items():
      arrays[key] = f[key]
      if arrays[key].shape != shape:
        raise ValueError(f"{path}: key '{key}' has shape {arrays[key].shape}, expected {shape}")
  params = {}
  for prefix in _layer_shapes():
    kernel, bias = fold_conv_bn(arrays[f"{prefix}.conv.weight"],
                                *(arrays[f"{prefix}.bn.{k}"] for k in _BN_KEYS))
    params[tuple(prefix.split(".")) + ("kernel",)] = kernel
    params[tuple(prefix.split(".")) + ("bias",)] = bias
  return traverse_util.unflatten_dict(params)


def get_feature_fn(path, precision=jax.lax.Precision.HIGHEST):
  """Pool3 feature extractor with weights from `path`.

  Args:
    path: `.npz` weight file (module docstring).
    precision: convolution precision; HIGHEST keeps full fp32 on GPU/TPU,
      whose default passes (TF32/bf16) would make features depend on the
      hardware.

  Returns:
    A jitted fn(images [B, H, W, 3 or 1] in [0, 1]) -> [B, 2048] float32;
    it compiles once per input shape.
  """
  model = InceptionV3(precision=precision)
  params = jax.device_put(load_params(path))

  @jax.jit
  def apply(params, images):
    return model.apply({"params": params}, preprocess(images))

  return functools.partial(apply, params)


def features(feature_fn, images, batch_size):
  """Features of a whole image array, in fixed-size batches.

  Args:
    feature_fn: fn([batch_size, H, W, C] in [0, 1]) -> [batch_size, F].
    images: [N, H, W, C] array, floats in [0, 1] or uint8 (divided by 255).
    batch_size: images per call; the last batch is padded to this size so
      the feature function compiles once.

  Returns:
    [N, F] numpy array.
  """
  out = []
  for start in range(0, len(images), batch_size):
    batch = input_pipeline.as_float(np.asarray(images[start:start + batch_size]))
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
    out.append(np.asarray(feature_fn(batch))[:n])
  return np.concatenate(out)


def fid(feature_fn, images_a, images_b, batch_size=100):
  """Frechet distance between the feature statistics of two image sets.

  With `get_feature_fn` this is FID; with another extractor, name the result
  after that extractor.

  Args:
    feature_fn: fn(images) -> [B, F] features, e.g. from `get_feature_fn`.
    images_a: [N, H, W, C] images (floats in [0, 1] or uint8), N >= 2.
    images_b: [M, H', W', C] images, M >= 2.
    batch_size: images per feature call.

  Returns:
    The Frechet distance, a float.
  """
  return frechet.feature_distance(features(feature_fn, images_a, batch_size),
                                  features(feature_fn, images_b, batch_size))
