"""The GEMM convolution equals lax.conv_general_dilated / nn.Conv, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sbmae.models import conv

HIGHEST = jax.lax.Precision.HIGHEST

# (kernel, stride, input size, in, out) for every kind of conv the models use,
# with tiny channels: the autoencoder's 5x5/2 stem, 3x3 blocks, 4x4/2
# downsampling (down to 2x2), its 5x5 64 -> 3 output conv and 1x1 skips; the
# classifier's 3x3/2 on odd sizes (7 -> 4); the U-Net's 3x3 on 2x2 and 1x1
# maps (taps reading only padding are dropped) and its 3x3/2 down to 1x1.
SHAPES = [
    (5, 2, 8, 3, 4), (3, 1, 4, 4, 4), (4, 2, 8, 3, 5), (5, 1, 6, 6, 2),
    (3, 1, 5, 5, 3), (1, 1, 4, 4, 6), (3, 2, 7, 3, 4), (3, 2, 8, 2, 3),
    (3, 1, 2, 3, 4), (3, 1, 1, 3, 4), (3, 2, 2, 3, 4), (3, 1, 1, 5, 2),
]


def _reference(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=HIGHEST)


def _inputs(k, size, cin, cout):
  kx, kk = jax.random.split(jax.random.PRNGKey(k * 100 + size * 10 + cin))
  return (jax.random.normal(kx, (2, size, size, cin)),
          jax.random.normal(kk, (k, k, cin, cout)) / np.sqrt(k * k * cin))


def _value_and_grads(fn, x, kernel, cotangent):
  """jitted (fn(x, kernel), d/d(x, kernel) sum(fn(x, kernel) * cotangent))."""
  with jax.default_matmul_precision("highest"):
    return jax.jit(lambda a, b: (fn(a, b), jax.grad(
        lambda a, b: jnp.sum(fn(a, b) * cotangent), argnums=(0, 1))(a, b)))(x, kernel)


def _assert_close(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,stride,size,cin,cout", SHAPES)
def test_conv_gemm_matches_lax_forward_and_gradients(k, stride, size, cin, cout):
  x, kernel = _inputs(k, size, cin, cout)
  padding = conv.resolve_padding("SAME", (size, size), (k, k), (stride, stride))
  out = -(-size // stride)
  cotangent = jax.random.normal(jax.random.PRNGKey(7), (2, out, out, cout))
  got = _value_and_grads(lambda a, b: conv.conv_gemm(a, b, (stride, stride), padding),
                         x, kernel, cotangent)
  want = _value_and_grads(lambda a, b: _reference(a, b, stride, padding), x, kernel, cotangent)
  _assert_close(got, want)


@pytest.mark.parametrize("padding", ["VALID", 2, ((0, 1), (2, 0))])
def test_conv_gemm_other_paddings(padding):
  x, kernel = _inputs(3, 6, 3, 4)
  pads = conv.resolve_padding(padding, (6, 6), (3, 3), (2, 2))
  with jax.default_matmul_precision("highest"):
    got = conv.conv_gemm(x, kernel, (2, 2), pads)
  np.testing.assert_allclose(got, _reference(x, kernel, 2, pads), rtol=1e-5, atol=1e-5)


def test_conv_module_shares_nn_conv_params_and_values():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 7, 3))
  ours = conv.Conv(5, (3, 3), strides=2)
  theirs = nn.Conv(5, (3, 3), strides=2, precision=HIGHEST)
  params = ours.init(jax.random.PRNGKey(1), x)
  ref_params = theirs.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_params)
  params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero bias too.
  with jax.default_matmul_precision("highest"):
    got = ours.apply(params, x)
    lax_impl = conv.Conv(5, (3, 3), strides=2, impl="lax").apply(params, x)
  np.testing.assert_allclose(got, theirs.apply(params, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lax_impl, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,stride,gemm_on_cpu",
                         [(2, 1, True), (4, 1, False), (4, 2, True), (8, 2, False)])
def test_auto_uses_gemm_for_tiny_outputs_on_cpu_only(size, stride, gemm_on_cpu):
  x = jnp.zeros((1, size, size, 2))
  module = conv.Conv(3, (3, 3), strides=stride)
  params = module.init(jax.random.PRNGKey(0), x)
  jaxpr = str(jax.make_jaxpr(lambda p: module.apply(p, x))(params))
  uses_lax = "conv_general_dilated" in jaxpr
  assert uses_lax == (jax.default_backend() != "cpu" or not gemm_on_cpu)
  padding = conv.resolve_padding("SAME", (size, size), (3, 3), (stride, stride))
  resolved = conv.resolve_impl(x.shape, (3, 3, 2, 3), (stride, stride), padding)
  assert resolved == ("lax" if uses_lax else "gemm")
  assert conv.resolve_impl(x.shape, (3, 3, 2, 3), (stride, stride), padding, "lax") == "lax"
  with pytest.raises(ValueError, match="impl"):
    conv.Conv(3, impl="fast").init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("size,cin,cout", [(1, 3, 2), (2, 4, 3), (4, 3, 5)])
def test_upsample_conv_matches_conv_of_upsampled(size, cin, cout):
  x, kernel = _inputs(3, size, cin, cout)
  cotangent = jax.random.normal(jax.random.PRNGKey(3), (2, 2 * size, 2 * size, cout))
  got = _value_and_grads(lambda a, b: conv.upsample_conv3x3(a, b, impl="gemm"),
                         x, kernel, cotangent)
  want = _value_and_grads(
      lambda a, b: _reference(conv.upsample_nearest(a), b, 1, ((1, 1), (1, 1))),
      x, kernel, cotangent)
  _assert_close(got, want)
  module = conv.Conv(cout, upsample=True)
  params = {"params": {"kernel": kernel, "bias": jnp.zeros(cout)}}
  with jax.default_matmul_precision("highest"):
    _assert_close(module.apply(params, x), want[0])


def test_depth_to_space_places_phases():
  x = jnp.arange(2 * 2 * 4, dtype=jnp.float32).reshape(1, 2, 2, 4)
  y = conv.depth_to_space(x)
  # Output pixel (2i + a, 2j + b) is input pixel (i, j), channel 2a + b.
  for i, j, a, b in np.ndindex(2, 2, 2, 2):
    assert y[0, 2 * i + a, 2 * j + b, 0] == x[0, i, j, 2 * a + b]


def test_compiler_options_keep_a_conv_net_step_s_values():
  # The conv nets compile with conv.compiler_options() (YNNPACK dots on CPU):
  # the loss and every gradient of a small autoencoder-like net must equal
  # XLA's default compilation within fp32 tolerance, and the option must
  # really be in effect on CPU (a dot handed to the library).
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.silu(conv.Conv(8, (3, 3), strides=(2, 2))(x))  # 8x8
      h = nn.silu(conv.Conv(16, (4, 4), strides=(2, 2))(h))  # 4x4
      h = nn.silu(conv.Conv(16, (3, 3), strides=(2, 2))(h))  # 2x2: the GEMM path
      z = nn.Dense(6)(h.reshape(h.shape[0], -1))
      h = nn.Dense(4 * 4 * 8)(z).reshape(-1, 4, 4, 8)
      h = conv.Conv(8, (3, 3))(conv.upsample_nearest(h))  # 8x8
      return conv.Conv(3, (5, 5))(h)

  x = jax.random.uniform(jax.random.key(0), (32, 16, 16, 3))
  net = Net()
  params = net.init(jax.random.key(1), x)
  loss = lambda p: jnp.mean((jax.nn.sigmoid(net.apply(p, x))[:, :8, :8] - x[:, ::2, ::2]) ** 2)
  grad = jax.value_and_grad(loss)
  plain = jax.jit(grad)(params)
  fast = conv.jit(grad)
  ours = fast(params)
  np.testing.assert_allclose(ours[0], plain[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(plain[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))
  hlo = fast.lower(params).compile().as_text()
  assert ("ynn" in hlo) == (jax.default_backend() == "cpu")
