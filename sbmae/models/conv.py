"""The project's one 2-D convolution: NHWC, HWIO kernel, nn.Conv's parameters.

`Conv` has nn.Conv's parameters ("kernel" [kh, kw, in, out] and "bias"), so
both implementations read the same checkpoints:

* "lax": lax.conv_general_dilated. On GPU/TPU always; on CPU (jax 0.10,
  XLA:CPU with YNNPACK) also for outputs of more than 4 positions, where
  whole train steps are faster with it. Timed alone (output + gradients,
  batch 256) the GEMM wins some of these convolutions (3x3 64 -> 256 at
  16x16: 340 ms vs 578 ms; 3x3 64 ch at 16x16: 157 vs 212 ms) and loses
  others (5x5 64 -> 3 at 32x32: 1.77 s vs 288 ms), yet sending the
  widening ones (more output than input channels) through it makes the
  steps slower: autoencoder 64-128-256 at batch 256 3.32 s vs 2.81-2.91 s,
  the cpu config's five 16-32-64 at batch 64 0.41 s vs 0.32-0.33 s.
* "gemm": im2col + ONE matrix product, used on CPU for outputs of at most 4
  positions (2x2 and less). At 2x2 and 1x1 XLA:CPU's convolution is 10-40x
  slower than the same FLOPs as a GEMM (3x3, 256 -> 1024 at 2x2: 2.56 s vs
  0.11 s; 4x4/2, 256 at 4x4 -> 2x2: 1.18 s vs 0.06 s). At 4x4 the GEMM loses
  on a quiet machine (whole train steps, median of 10, interleaved: the
  autoencoder 64-128-256 at batch 256 1.93 s with 2x2 and less on the GEMM
  vs 2.11 s with 4x4 too; the cpu config's five 16-32-64 autoencoders at
  batch 64 0.248 s vs 0.278 s, 0.304 s with no GEMM at all; the five
  classifiers at batch 128 0.189 s vs 0.208 s). The receptive fields are gathered by
  pad, strided slices and one concatenation (the backward is pads and adds);
  `lax.conv_general_dilated_patches` is slower (3x3, 64 ch at 16x16: 1.96 s,
  its backward is itself a convolution). Taps whose every read falls in the
  zero padding are dropped, so a 3x3 conv of a 1x1 map is its centre tap.

`impl="auto"` picks per call from `jax.default_backend()` (at trace time) and
the output size; `bench/bench_conv.py` gives the figures above.

The figures above are with XLA:CPU's default dot emitter. The conv nets' jitted
functions are compiled with `compiler_options()`, which on CPU hands every dot
of the program to YNNPACK (XLA's LIBRARY_FUSION_TYPE_DOT). XLA:CPU lowers the
gradients of these convolutions partly to dots, so this speeds the train steps:
autoencoder 64-128-256 at batch 256 2.75-2.84 s -> 1.67-1.94 s (28-30% ->
44-52% of the measured matmul peak), the five classifiers at batch 256 0.54 s
-> 0.41-0.43 s, one 3x3 64-channel convolution at 16x16 (output + gradients,
batch 256) 205 ms -> 60 ms (`bench/bench_conv.py`, `bench_autoencoder.py`,
`bench_classifier.py`; 2026-12-01). It is not set process-wide: the MLP
prior's sampler is slower with it (4.12 s -> 5.38 s, `bench/bench_prior.py
--models=mlp`). The option is experimental in XLA (jax 0.10.2 pinned).
"""

from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "gemm", "lax")
# On CPU, "auto" uses the GEMM for outputs of at most this many positions.
GEMM_MAX_POSITIONS = 4
_DIMS = ("NHWC", "HWIO", "NHWC")


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def resolve_padding(padding, in_hw, kernel_hw, strides):
  """nn.Conv padding ("SAME", "VALID", int or pairs) -> ((top, bottom), (left, right))."""
  if isinstance(padding, str):
    return tuple(tuple(p) for p in jax.lax.padtype_to_pads(in_hw, kernel_hw, strides, padding))
  if isinstance(padding, int):
    return ((padding, padding),) * 2
  return tuple(_pair(p) for p in padding)


def _taps(size, pad_lo, k, stride, out_size):
  """Kernel offsets along one axis that read at least one non-padding element."""
  return [i for i in range(k)
          if any(pad_lo <= i + o * stride < pad_lo + size for o in range(out_size))]


def conv_gemm(x, kernel, strides=(1, 1), padding=((0, 0), (0, 0))):
  """Convolution as im2col + one GEMM; equals lax.conv_general_dilated.

  Args:
    x: [B, H, W, in] input.
    kernel: [kh, kw, in, out] kernel.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)) zero padding.

  Returns:
    [B, Ho, Wo, out], Ho = (H + top + bottom - kh) // sh + 1 (likewise Wo).
  """
  b, h, w, _ = x.shape
  kh, kw, _, cout = kernel.shape
  (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
  ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  rows, cols = _taps(h, pt, kh, sh, ho), _taps(w, pl, kw, sw, wo)
  if not rows or not cols:
    return jnp.zeros((b, ho, wo, cout), jnp.result_type(x, kernel))
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  patches = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
             for i in rows for j in cols]
  patches = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
  kernel = kernel[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # taps are contiguous.
  return patches @ kernel.reshape(-1, cout)


def compiler_options():
  """XLA options for the conv nets' jitted functions: None off CPU (module docstring)."""
  if jax.default_backend() != "cpu":
    return None
  return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def jit(fn, **kwargs):
  """jax.jit(fn, **kwargs) with `compiler_options()`: for functions of conv nets."""
  return jax.jit(fn, compiler_options=compiler_options(), **kwargs)


def resolve_impl(x_shape, kernel_shape, strides, padding, impl="auto"):
  """The implementation `conv2d` runs: `impl`, or for "auto" the module docstring's rule.

  Args:
    x_shape: [B, H, W, in].
    kernel_shape: [kh, kw, in, out].
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).
    impl: "auto", "gemm" or "lax".

  Returns:
    "gemm" or "lax".
  """
  if impl not in IMPLS:
    raise ValueError(f"Conv impl={impl!r}; expected one of {IMPLS}.")
  if impl != "auto":
    return impl
  (kh, kw), (sh, sw) = kernel_shape[:2], strides
  ho = (x_shape[1] + sum(padding[0]) - kh) // sh + 1
  wo = (x_shape[2] + sum(padding[1]) - kw) // sw + 1
  small = ho * wo <= GEMM_MAX_POSITIONS
  return "gemm" if jax.default_backend() == "cpu" and small else "lax"


def conv2d(x, kernel, strides=(1, 1), padding=((0, 0), (0, 0)), impl="auto"):
  """NHWC/HWIO convolution by `impl`: "gemm", "lax" or "auto" (see module docstring).

  Args:
    x: [B, H, W, in] input.
    kernel: [kh, kw, in, out] kernel.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)) zero padding.
    impl: "auto", "gemm" or "lax".

  Returns:
    [B, Ho, Wo, out].
  """
  strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
  impl = resolve_impl(x.shape, kernel.shape, strides, padding, impl)
  if impl == "gemm":
    return conv_gemm(x, kernel, strides, padding)
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=_DIMS)


def depth_to_space(x, block=2):
  """[B, H, W, block^2 * C] -> [B, block * H, block * W, C] (pixel shuffle)."""
  b, h, w, c = x.shape
  c //= block * block
  x = x.reshape(b, h, w, block, block, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, block * h, block * w, c)


def upsample_nearest(x, factor=2):
  """Nearest-neighbour upsampling of [B, H, W, C] by `factor`."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
  return x.reshape(b, factor * h, factor * w, c)


# _FOLD[a] maps a 3x3 kernel's rows to the two rows of the original map read by
# output row phase a of a 3x3 SAME conv of the 2x nearest-upsampled map: phase 0
# reads upsampled rows 2i-1, 2i, 2i+1 = original rows i-1, i, i; phase 1 reads
# 2i, 2i+1, 2i+2 = i, i, i+1.
_FOLD = np.array([[[1, 0, 0], [0, 1, 1]],
                  [[1, 1, 0], [0, 0, 1]]], np.float32)


def upsample_conv3x3(x, kernel, impl="auto"):
  """conv3x3_SAME(upsample_nearest(x, 2), kernel), as a sub-pixel convolution.

  Each of the 4 output phases is a 2x2 convolution of x with the kernel's
  rows/columns summed by `_FOLD`: 16 instead of 36 multiply-adds per input
  pixel and channel pair, at the input's resolution; depth-to-space
  interleaves the phases. "lax" computes the plain reference instead.

  Args:
    x: [B, H, W, in].
    kernel: [3, 3, in, out].
    impl: as `conv2d` (used for each phase).

  Returns:
    [B, 2H, 2W, out].
  """
  if impl == "lax":
    return conv2d(upsample_nearest(x), kernel, (1, 1), ((1, 1), (1, 1)), impl)
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  k = jnp.einsum("aur,bvs,rsio->abuvio", _FOLD, _FOLD, kernel)
  phases = [conv2d(xp[:, a:a + h + 1, c:c + w + 1], k[a, c], impl=impl)
            for a in range(2) for c in range(2)]
  return depth_to_space(jnp.concatenate(phases, axis=-1))


class Conv(nn.Module):
  """2-D convolution with nn.Conv's parameters and defaults (SAME padding).

  Attributes:
    features: output channels.
    kernel_size: (kh, kw) or an int for a square kernel.
    strides: (sh, sw) or an int.
    padding: "SAME" (nn.Conv's default), "VALID", an int, or ((top, bottom),
      (left, right)).
    use_bias: add a learnt bias.
    kernel_init: initialiser of the [kh, kw, in, out] kernel.
    bias_init: initialiser of the bias.
    upsample: convolve the 2x nearest-upsampled input (3x3, stride 1, SAME
      only), computed as a sub-pixel conv at the input's resolution.
    impl: "auto", "gemm" or "lax" (see the module docstring).
  """
  features: int
  kernel_size: Union[int, Sequence[int]] = (3, 3)
  strides: Union[int, Sequence[int]] = 1
  padding: Any = "SAME"
  use_bias: bool = True
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Any] = nn.initializers.zeros
  upsample: bool = False
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    kernel_hw, strides = _pair(self.kernel_size), _pair(self.strides)
    kernel = self.param("kernel", self.kernel_init,
                        kernel_hw + (x.shape[-1], self.features))
    if self.upsample:
      if kernel_hw != (3, 3) or strides != (1, 1) or self.padding != "SAME":
        raise ValueError("Conv(upsample=True) supports 3x3, stride 1, SAME only.")
      y = upsample_conv3x3(x, kernel, self.impl)
    else:
      padding = resolve_padding(self.padding, x.shape[1:3], kernel_hw, strides)
      y = conv2d(x, kernel, strides, padding, self.impl)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,))
    return y
