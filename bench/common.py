"""Timing helpers shared by the benchmarks: medians, XLA FLOP counts, share of peak,
and where a step's time goes (`op_breakdown`)."""

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from sbmae.models import conv


def flops(compiled):
  """FLOPs of a compiled function from XLA's cost analysis (nan if unknown)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per device.
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def median_seconds(fn, iters, warmup=1):
  """Median wall time of `fn()` (blocked until ready) over `iters` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measured_peak_gflops(n=2048, iters=10):
  """fp32 matmul peak of this machine through XLA (GFLOP/s), best of `iters`.

  The best rather than the median: the peak is what the machine can do, and
  on a shared machine the median mostly measures the other tenants. Best
  also over XLA's default compilation and the conv nets' options
  (`conv.compiler_options()`, YNNPACK dots on CPU), so no step is credited
  with a share of a slower matmul than the machine offers.
  """
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  best = float("inf")
  for options in (None, conv.compiler_options()):
    matmul = jax.jit(lambda x: x @ x, compiler_options=options)
    jax.block_until_ready(matmul(a))
    for _ in range(iters):
      start = time.perf_counter()
      jax.block_until_ready(matmul(a))
      best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best / 1e9


def print_peak():
  """Measures, prints and returns the matmul peak that shares are taken of."""
  peak = measured_peak_gflops()
  print(f"JAX {jax.__version__}, devices {jax.devices()}; measured XLA fp32 matmul "
        f"peak (2048^2, best of 10, default and conv compiler options): {peak:.0f} GFLOP/s; "
        # It changed CPU step times by 4-12% here (README, "Below the XLA ops").
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}", flush=True)
  return peak


def report(name, seconds, items, unit, num_flops, peak_gflops):
  """Prints time, throughput, GFLOP/s and the share of `peak_gflops`."""
  gflops = num_flops / seconds / 1e9
  print(f"{name}: {seconds:.4f} s, {items / seconds:,.1f} {unit}/s, "
        f"{num_flops / 1e9:.2f} GFLOP, {gflops:.1f} GFLOP/s "
        f"({100 * gflops / peak_gflops:.1f}% of {peak_gflops:.0f})", flush=True)


# XLA:CPU op names (HLO instruction names) -> what the op does, first match wins.
_OP_KINDS = (
    ("convolution", r"^(conv_general_dilated|convolution)"),
    ("dot (YNNPACK / XLA)", r"^(ynn_fusion|dot)"),
    ("reduction (bias gradients, sums)", r"reduce"),
    ("layout (transposes, copies, pads, concatenations)",
     r"^(transpose|copy|concatenate|pad|slice|bitcast_copy|dynamic)"),
    ("elementwise fusion (activations, their gradients, optimiser)", r"fusion|^wrapped_"),
)
# Events that contain other ops (counted through them) or are not XLA ops.
_OP_SKIP = re.compile(r"^(while|conditional|call)(\.\d+)?$|^[A-Z]|[^\w.\-]")


def op_kind(name):
  """The `_OP_KINDS` label of an XLA:CPU op name ("other" if none matches)."""
  for kind, pattern in _OP_KINDS:
    if re.search(pattern, name):
      return kind
  return "other"


def op_breakdown(fn, iters=5):
  """Profiles `iters` calls of `fn()` and prints where the XLA op time goes.

  Runs `jax.profiler.trace` (perfetto trace), sums the duration of every XLA
  op event by `op_kind` and prints each kind's time per call, its share of
  the op time, and the op time's share of the wall time (the rest is the
  runtime's gaps between ops; above 100% ops ran concurrently).

  Returns:
    {kind: seconds per call}, or {} where the trace held no XLA ops.
  """
  jax.block_until_ready(fn())
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(iters):
        jax.block_until_ready(fn())
      wall = (time.perf_counter() - start) / iters
    paths = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    events = {}
    if paths:
      with gzip.open(paths[0]) as f:
        events = json.load(f)
  events = events.get("traceEvents", []) if isinstance(events, dict) else events
  seconds, counts = collections.Counter(), collections.Counter()
  for event in events:
    name = event.get("name", "")
    if event.get("ph") == "X" and not _OP_SKIP.search(name):
      kind = op_kind(name)
      seconds[kind] += event.get("dur", 0) * 1e-6 / iters
      counts[kind] += 1
  total = sum(seconds.values())
  if not total:
    print("  op breakdown: the profiler trace held no XLA op events", flush=True)
    return {}
  print(f"  op time {1e3 * total:.1f} ms per call, {100 * total / wall:.0f}% of the "
        f"wall time under the profiler ({1e3 * wall:.1f} ms):", flush=True)
  for kind, t in seconds.most_common():
    print(f"    {1e3 * t:8.1f} ms {100 * t / total:5.1f}%  {counts[kind] // iters:5d} ops  {kind}",
          flush=True)
  return dict(seconds)


def time_train_step(name, step, state, batch, items, unit, peak_gflops, iters,
                    profile=False):
  """Times a donating train step (state, batch, rng) -> (state, metrics) and reports it.

  Args:
    name: label of the printed line.
    step: the jitted train step.
    state: its initial TrainState (donated and replaced as the step runs).
    batch: one batch, reused for every call.
    items: examples per step (for the throughput).
    unit: their name ("images", "examples").
    peak_gflops: the machine's measured peak.
    iters: timed calls.
    profile: also print where the step's op time goes (`op_breakdown`).
  """
  rng = jax.random.PRNGKey(1)
  num_flops = flops(step.lower(state, batch, rng).compile())
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], batch, rng)
    return metrics["loss"]

  report(name, median_seconds(run, iters), items, unit, num_flops, peak_gflops)
  if profile:
    op_breakdown(run, iters)
