"""The benchmarks' op-time breakdown (bench/common.py) reads real profiler traces."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

from sbmae.models import conv

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import bench_conv  # pylint: disable=g-import-not-at-top,wrong-import-position
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
  assert "ops ran" in out, out
  assert seconds.get("dot (YNNPACK / XLA)", 0.0) > 0.0, seconds
  assert all(t >= 0.0 for t in seconds.values())


def _op(name, ts, dur, tid=1):
  return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def test_op_spans_run_asynchronous_ops_to_their_end_markers():
  events = [
      _op("conv_general_dilated.3", 0.0, 0.5),     # launched, runs in the pool
      _op("add_fusion.1", 1.0, 2.0),               # synchronous: its own event
      _op("end: conv_general_dilated.3", 10.0, 0.0, tid=2),
      _op("conv_general_dilated.3", 20.0, 0.5),    # the next call of the same op
      _op("end: conv_general_dilated.3", 25.0, 0.0, tid=3),
      _op("ThunkExecutor::Execute", 0.0, 30.0),    # not an XLA op
  ]
  spans = sorted(common.op_spans(events))
  assert spans == [("add_fusion.1", 1.0, 3.0), ("conv_general_dilated.3", 0.0, 10.0),
                   ("conv_general_dilated.3", 20.0, 25.0)]


def test_shared_time_splits_overlaps_and_adds_up_to_the_busy_time():
  spans = [("convolution.1", 0.0, 10.0), ("convolution.2", 0.0, 10.0), ("fusion.1", 5.0, 15.0),
           ("copy.1", 20.0, 22.0)]
  shared = common.shared_time(spans, common.op_kind)
  # 0-5: two convolutions; 5-10: two convolutions and a fusion; 10-15: the
  # fusion; 20-22: the copy. 17 us in which some op ran.
  assert shared["convolution"] == pytest.approx(5.0 + 5.0 * 2 / 3)
  assert shared[common.op_kind("fusion.1")] == pytest.approx(5.0 / 3 + 5.0)
  assert shared[common.op_kind("copy.1")] == pytest.approx(2.0)
  assert sum(shared.values()) == pytest.approx(17.0)


def test_model_convs_finds_the_classifier_s_convolutions():
  convs = bench_conv.model_convs(bench_conv.MODELS["classifier"][0], (2, 28, 28, 3))
  assert sum(convs.values()) == 6
  kernels = sorted(k[1] for k in convs)
  assert kernels == sorted([(3, 3, 3, 32), (3, 3, 32, 32), (3, 3, 32, 64), (3, 3, 64, 64),
                            (3, 3, 64, 128), (3, 3, 128, 128)])
  for (x_shape, kernel, strides, padding, impl) in convs:
    assert impl == conv.resolve_impl(x_shape, kernel, strides, padding)


def test_conv_labels_names_the_convolutions_of_compiled_hlo():
  x, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  fn = jax.jit(lambda x, k: jnp.tanh(jax.lax.conv_general_dilated(
      x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))))
  labels = common.conv_labels(fn.lower(x, kernel).compile().as_text())
  assert len(labels) == 1, labels
  (label,) = labels.values()
  assert label.startswith("convolution f32[2,4,4,4] size=3x3 stride=2x2"), label


def test_flops_counts_a_matmul_and_a_convolution_before_compilation():
  a, b = jnp.ones((16, 32)), jnp.ones((32, 8))
  assert common.flops(jax.jit(jnp.matmul).lower(a, b)) == 2 * 16 * 32 * 8
  # A 3x3 VALID convolution, 5x5 input -> 3x3 output, 4 -> 6 channels, batch 2: the
  # kind of op XLA:GPU's compiled cost analysis leaves out (cuDNN custom calls).
  x, kernel = jnp.ones((2, 5, 5, 4)), jnp.ones((3, 3, 4, 6))
  fn = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  assert common.flops(fn.lower(x, kernel)) == 2 * (2 * 3 * 3 * 6) * (3 * 3 * 4)
