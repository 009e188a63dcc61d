"""Forward + backward of single convolutions by implementation (decides conv.py's choices).

For the conv shapes of the models (batch 256), times the output conv(x, k)
together with its vector-Jacobian product for a cotangent g (wrt input and
kernel), as a train step computes them, for:
  lax      lax.conv_general_dilated (XLA:CPU's convolution);
  gemm     sbmae.models.conv.conv_gemm: pad/slice/concat im2col + one GEMM;
  patches  lax.conv_general_dilated_patches im2col + one GEMM;
and prints each one's time and share of the measured matmul peak (the FLOPs
are the convolution's 3 x 2 * M * K * N, the same for all).

`--model=classifier|autoencoder` instead times every convolution of a model
as the model runs it (the implementation `conv2d` picks; shapes and counts
found by tracing the model): the classifier at width 32 and batch 128, or the
`cpu` config's 16-32-64 autoencoder with the sub-pixel head at batch 64, each
times `--modalities`. The total, against the train step's time
(`bench_classifier.py`, `bench_autoencoder.py`), is the convolutions' share
of the step: an upper bound, since every convolution is timed with both
gradients and the first one needs no input gradient.

  JAX_PLATFORMS=cpu python bench/bench_conv.py [--impls=lax,gemm,patches] [--shapes=ae]
  JAX_PLATFORMS=cpu python bench/bench_conv.py --model=autoencoder [--modalities=5]
"""

import collections

from absl import app
from absl import flags
import jax
import numpy as np

import common
from sbmae.models import autoencoder
from sbmae.models import classifier
from sbmae.models import conv

FLAGS = flags.FLAGS
flags.DEFINE_list("impls", ["lax", "gemm", "patches"], "Implementations to time.")
flags.DEFINE_list("shapes", ["ae", "tiny", "clf", "unet"], "Shape groups to time.")
flags.DEFINE_integer("iters", 3, "Timed calls.")
flags.DEFINE_integer("batch", None, "Batch size (default 256; with --model, its own).")
flags.DEFINE_enum("model", None, ["classifier", "autoencoder"], "Time this model's "
                  "convolutions (--batch defaults to its batch size) instead of --shapes.")
flags.DEFINE_integer("modalities", 5, "With --model: networks per step (counts multiply).")
flags.DEFINE_bool("compiler_options", True, "Compile with conv.compiler_options(), as the "
                  "models' jitted functions are (off: XLA's defaults).")

# name -> list of (label, kernel, stride, input size, in, out).
SHAPES = {
    "ae": [("stem 5x5/2 3->64 @32", 5, 2, 32, 3, 64),
           ("res 3x3 64 @16", 3, 1, 16, 64, 64),
           ("down 4x4/2 64->128 @16", 4, 2, 16, 64, 128),
           ("res 3x3 128 @8", 3, 1, 8, 128, 128),
           ("res 3x3 256 @4", 3, 1, 4, 256, 256),
           ("up 3x3 64->256 @16", 3, 1, 16, 64, 256),
           ("out 5x5 64->3 @32", 5, 1, 32, 64, 3)],
    # The cpu config's autoencoders (16-32-64); time them with --batch=64.
    "cpu": [("stem 5x5/2 3->16 @32", 5, 2, 32, 3, 16),
            ("res 3x3 16 @16", 3, 1, 16, 16, 16),
            ("down 4x4/2 16->32 @16", 4, 2, 16, 16, 32),
            ("up 3x3 16->64 @16", 3, 1, 16, 16, 64),
            ("res 3x3 32 @8", 3, 1, 8, 32, 32),
            ("out 5x5 16->3 @32", 5, 1, 32, 16, 3)],
    # The DigitClassifier's (width 32); time them with --batch=128.
    "clf": [("clf 3x3/2 3->32 @28", 3, 2, 28, 3, 32),
            ("clf 3x3 32 @14", 3, 1, 14, 32, 32),
            ("clf 3x3/2 32->64 @14", 3, 2, 14, 32, 64),
            ("clf 3x3 64 @7", 3, 1, 7, 64, 64),
            ("clf 3x3/2 64->128 @7", 3, 2, 7, 64, 128),
            ("clf 3x3 128 @4", 3, 1, 4, 128, 128)],
    "tiny": [("ae up 3x3 256->1024 @2", 3, 1, 2, 256, 1024),
             ("ae down 4x4/2 256 @4", 4, 2, 4, 256, 256),
             ("unet 3x3 128 @2", 3, 1, 2, 128, 128),
             ("unet 3x3/2 128 @2", 3, 2, 2, 128, 128),
             ("unet 3x3 128 @1", 3, 1, 1, 128, 128),
             ("unet 3x3/2 128 @4", 3, 2, 4, 128, 128),
             ("clf 3x3 128 @4", 3, 1, 4, 128, 128)],
    "unet": [("unet 3x3 64 @8", 3, 1, 8, 64, 64),
             ("unet 3x3 192->64 @8", 3, 1, 8, 192, 64),
             ("unet 3x3 128 @4", 3, 1, 4, 128, 128),
             ("unet 3x3/2 64 @8", 3, 2, 8, 64, 64),
             ("ae down 4x4/2 128->256 @8", 4, 2, 8, 128, 256)],
}


def patches_conv(x, kernel, strides, padding):
  kh, kw, cin, cout = kernel.shape
  p = jax.lax.conv_general_dilated_patches(
      x, (kh, kw), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # Patch features are ordered (in, kh, kw).
  return p @ kernel.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout)


def lax_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


IMPLS = {"lax": lax_conv, "gemm": conv.conv_gemm, "patches": patches_conv}


def time_conv(fn, x_shape, kernel_shape):
  """(median seconds, FLOPs) of fn(x, kernel)'s output and gradients wrt both.

  The output is returned with the gradients: the gradient of a linear map
  needs no forward, and XLA drops an unused one (grad alone times the
  backward). The cotangent is an argument: as a closed-over constant XLA
  folds its transposes. FLOPs: 3 x 2 * M * K * N of the convolution.
  """
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  kernel = jax.random.normal(jax.random.PRNGKey(1), kernel_shape) * 0.05
  out = jax.eval_shape(fn, x, kernel).shape
  g = jax.random.normal(jax.random.PRNGKey(2), out)

  def value_and_vjp(x, kernel, g):
    y, vjp = jax.vjp(fn, x, kernel)
    return y, vjp(g)

  step = jax.jit(value_and_vjp,
                 compiler_options=conv.compiler_options() if FLAGS.compiler_options else None)
  seconds = common.median_seconds(lambda: step(x, kernel, g), FLAGS.iters)
  return seconds, 3 * 2 * out[0] * out[1] * out[2] * int(np.prod(kernel_shape))


def bench_shape(label, k, s, size, cin, cout, peak):
  b = FLAGS.batch or 256
  pads = conv.resolve_padding("SAME", (size, size), (k, k), (s, s))
  line = [label.ljust(24)]
  for name in FLAGS.impls:
    seconds, num_flops = time_conv(lambda x, w, fn=IMPLS[name]: fn(x, w, (s, s), pads),
                                   (b, size, size, cin), (k, k, cin, cout))
    line.append(f"{name} {1e3 * seconds:7.1f} ms ({100 * num_flops / seconds / 1e9 / peak:3.0f}%)")
  line.insert(1, f"{num_flops / 1e9:6.2f} GFLOP")
  print(" | ".join(line), flush=True)


# --model: (module, input shape without the batch, default batch size).
MODELS = {
    "classifier": (classifier.DigitClassifier(width=32), (28, 28, 3), 128),
    "autoencoder": (autoencoder.AutoEncoder(kind="image", shape=(28, 28, 3), latent_dim=64,
                                            widths=(16, 32, 64), variational=True,
                                            decoder_head="subpixel"), (28, 28, 3), 64),
}


def model_convs(module, x_shape):
  """{(x shape, kernel shape, strides, padding, impl): count} of one forward of `module`."""
  found = collections.Counter()
  inner = conv.conv2d

  def recording(x, kernel, strides=(1, 1), padding=((0, 0), (0, 0)), impl="auto"):
    strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
    impl = conv.resolve_impl(x.shape, kernel.shape, strides, padding, impl)
    found[(tuple(x.shape), tuple(kernel.shape), strides, padding, impl)] += 1
    return inner(x, kernel, strides, padding, impl)

  conv.conv2d = recording
  try:
    jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(x_shape, "float32"))
  finally:
    conv.conv2d = inner
  return found


def bench_model(name, peak):
  """Times each convolution of model `name` as it runs in the model; prints the total."""
  module, shape, default_batch = MODELS[name]
  b = FLAGS.batch or default_batch
  total_seconds, total_flops = 0.0, 0.0
  for (xs, ks, strides, pads, impl), count in model_convs(module, (b,) + shape).items():
    seconds, num_flops = time_conv(
        lambda x, w, s=strides, p=pads, i=impl: conv.conv2d(x, w, s, p, i), xs, ks)
    count *= FLAGS.modalities
    total_seconds += count * seconds
    total_flops += count * num_flops
    print(f"{ks[0]}x{ks[1]}/{strides[0]} {ks[2]:4d} -> {ks[3]:4d} @{xs[1]:2d} ({impl}) x{count:3d}: "
          f"{1e3 * seconds:7.2f} ms each ({100 * num_flops / seconds / 1e9 / peak:3.0f}%), "
          f"{1e3 * count * seconds:7.1f} ms", flush=True)
  print(f"{name} x {FLAGS.modalities}, batch {b}: convolutions (output + both gradients) "
        f"{1e3 * total_seconds:.1f} ms per step, {total_flops / 1e9:.2f} GFLOP "
        f"({100 * total_flops / total_seconds / 1e9 / peak:.0f}% of peak)", flush=True)


def main(_):
  peak = common.measured_peak_gflops()
  print(f"measured matmul peak {peak:.0f} GFLOP/s; fwd+bwd per conv; "
        f"compiler options {conv.compiler_options() if FLAGS.compiler_options else None}")
  if FLAGS.model:
    bench_model(FLAGS.model, peak)
    return
  print(f"batch {FLAGS.batch or 256}")
  for group in FLAGS.shapes:
    for shape in SHAPES[group]:
      bench_shape(*shape, peak)


if __name__ == "__main__":
  app.run(main)
