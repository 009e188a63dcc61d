"""Timing helpers shared by the benchmarks: medians, XLA FLOP counts, share of peak."""

import statistics
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
        f"peak (2048^2, best of 10, default and conv compiler options): {peak:.0f} GFLOP/s",
        flush=True)
  return peak


def report(name, seconds, items, unit, num_flops, peak_gflops):
  """Prints time, throughput, GFLOP/s and the share of `peak_gflops`."""
  gflops = num_flops / seconds / 1e9
  print(f"{name}: {seconds:.4f} s, {items / seconds:,.1f} {unit}/s, "
        f"{num_flops / 1e9:.2f} GFLOP, {gflops:.1f} GFLOP/s "
        f"({100 * gflops / peak_gflops:.1f}% of {peak_gflops:.0f})", flush=True)


def time_train_step(name, step, state, batch, items, unit, peak_gflops, iters):
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
  """
  rng = jax.random.PRNGKey(1)
  num_flops = flops(step.lower(state, batch, rng).compile())
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], batch, rng)
    return metrics["loss"]

  report(name, median_seconds(run, iters), items, unit, num_flops, peak_gflops)
