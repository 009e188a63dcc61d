"""The benchmarks' op-time breakdown (bench/common.py) reads real profiler traces."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize("name, kind", [
    ("conv_general_dilated.298", "convolution"),
    ("convolution-base-dilated", "convolution"),
    ("ynn_fusion.7", "dot (YNNPACK / XLA)"),
    ("wrapped_reduce-window.23", "reduction (bias gradients, sums)"),
    ("transpose_copy_fusion.17", "layout (transposes, copies, pads, concatenations)"),
    ("copy.280", "layout (transposes, copies, pads, concatenations)"),
    ("add_divide_fusion.21", "elementwise fusion (activations, their gradients, optimiser)"),
    ("rng-bit-generator", "other"),
])
def test_op_kind(name, kind):
  assert common.op_kind(name) == kind


def test_op_breakdown_finds_the_ops_of_a_profiled_function(capsys):
  x = jax.random.normal(jax.random.PRNGKey(0), (256, 256))
  fn = jax.jit(lambda x: jnp.tanh(x @ x).sum(0))
  seconds = common.op_breakdown(lambda: fn(x), iters=2)
  out = capsys.readouterr().out
  assert "op time" in out, out
  assert seconds.get("dot (YNNPACK / XLA)", 0.0) > 0.0, seconds
  assert all(t >= 0.0 for t in seconds.values())
