"""Timing helpers shared by the benchmarks: medians, XLA FLOP counts, share of peak,
and where a step's time goes (`op_breakdown`)."""

import bisect
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


def flops(lowered):
  """FLOPs of a lowered (not yet compiled) function from XLA's cost analysis.

  Taken from the HLO before optimisation, so the count does not depend on the
  backend: the compiled program's cost analysis on XLA:GPU leaves out the
  convolutions it hands to cuDNN (an autoencoder 64-128-256 train step at batch
  256 counted 1.24 GFLOP on an H200, where its lowered program counts 280.5). On
  CPU the two counts agree within 0.3% for the autoencoder and classifier steps.
  """
  cost = lowered.cost_analysis()
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
        # It changed CPU step times by 4-12% here (docs/speed.md, "Below the XLA ops").
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


def op_spans(events):
  """(name, start, end) in microseconds of every XLA op in a trace's events.

  An op's event ("ph" "X", its "ts" and "dur") covers the thread that ran it.
  An op that XLA:CPU hands to its thread pool (asynchronous; convolutions
  compiled with `conv.compiler_options()`) returns at once: its event lasts
  microseconds, and the pool marks its completion with an event named
  "end: NAME". Each op event is matched to the first unmatched end marker of
  its name at or after its start, and ends there where that is later than
  the event's own end.
  """
  ops = [e for e in events if e.get("ph") == "X" and not _OP_SKIP.search(e.get("name", ""))]
  ends = collections.defaultdict(list)
  for event in events:
    name = event.get("name", "")
    if name.startswith("end: "):
      ends[name[len("end: "):]].append(float(event["ts"]))
  for stamps in ends.values():
    stamps.sort()
  used = collections.Counter()
  spans = []
  for event in sorted(ops, key=lambda e: float(e["ts"])):
    name, start = event["name"], float(event["ts"])
    end = start + float(event.get("dur", 0))
    stamps = ends.get(name, ())
    i = max(used[name], bisect.bisect_left(stamps, start))
    if i < len(stamps):
      end = max(end, stamps[i])
      used[name] = i + 1
    spans.append((name, start, end))
  return spans


def shared_time(spans, key):
  """{key(name): time} splitting each instant equally among the spans open then.

  Ops overlap (async ones wait in the thread pool beside others), so summed
  spans exceed the wall time; shared, they add up to the time in which some
  op ran, and an instant with n ops open counts 1/n for each. An async op
  still queued in the pool counts as open, so a kind launched many at a
  time (convolutions) can be credited with part of its neighbours' time.
  """
  bounds = sorted({t for _, start, end in spans for t in (start, end)})
  index = {t: i for i, t in enumerate(bounds)}
  # Per boundary segment: the open ops' keys (difference arrays per key).
  delta = collections.defaultdict(lambda: [0] * len(bounds))
  for name, start, end in spans:
    if end > start:
      delta[key(name)][index[start]] += 1
      delta[key(name)][index[end]] -= 1
  keys = list(delta)
  open_count = {k: 0 for k in keys}
  result = collections.Counter()
  for i in range(len(bounds) - 1):
    for k in keys:
      open_count[k] += delta[k][i]
    total = sum(open_count.values())
    if total:
      dt = bounds[i + 1] - bounds[i]
      for k in keys:
        if open_count[k]:
          result[k] += dt * open_count[k] / total
  return result


_CONV_LINE = re.compile(r"%(\S+) = (\w+\[[\d,]*\])\S* convolution\(.*window=\{([^}]*)\}"
                        r".*dim_labels=([^,\s]+)")


def conv_labels(hlo_text):
  """{op name: "output shape, window, dim labels"} of the convolutions in HLO text.

  `compiled.as_text()` of a jitted function; names are those of the profiler's
  op events, so `op_breakdown` can group a step's convolutions by shape.
  """
  return {m.group(1): f"convolution {m.group(2)} {m.group(3)} {m.group(4)}"
          for m in map(_CONV_LINE.search, hlo_text.splitlines()) if m}


def op_breakdown(fn, iters=5, hlo_text=None, top=15):
  """Profiles `iters` calls of `fn()` and prints where their wall time goes.

  Runs `jax.profiler.trace` (perfetto trace) and takes every XLA op from its
  start to its completion (`op_spans`). Prints the time in which some op
  ran and its share of the wall time (the rest is the runtime's gaps), then
  per `op_kind` its part of that time (`shared_time`: concurrent ops split
  it), its summed op time (concurrent ops each counted in full) and its ops
  per call. With the function's compiled `hlo_text`, also the `top` groups of
  ops by shared time: convolutions by shape (`conv_labels`), other ops by
  name without their number.

  Returns:
    {kind: seconds per call of shared time}, or {} where the trace held no
    XLA ops.
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
  spans = op_spans(events)
  shared = {k: t * 1e-6 / iters for k, t in shared_time(spans, op_kind).items()}
  summed, counts = collections.Counter(), collections.Counter()
  for name, start, end in spans:
    summed[op_kind(name)] += (end - start) * 1e-6 / iters
    counts[op_kind(name)] += 1
  busy = sum(shared.values())
  if not busy:
    print("  op breakdown: the profiler trace held no XLA op events", flush=True)
    return {}
  print(f"  ops ran {1e3 * busy:.1f} ms per call, {100 * busy / wall:.0f}% of the wall "
        f"time under the profiler ({1e3 * wall:.1f} ms); per kind, that time shared "
        "among concurrent ops, and the ops' summed time:", flush=True)
  for kind, t in sorted(shared.items(), key=lambda kv: -kv[1]):
    print(f"    {1e3 * t:8.1f} ms {100 * t / busy:5.1f}%  (summed {1e3 * summed[kind]:8.1f} "
          f"ms)  {counts[kind] // iters:5d} ops  {kind}", flush=True)
  if hlo_text:
    labels = conv_labels(hlo_text)
    groups = shared_time(spans, lambda n: labels.get(n, re.sub(r"\.\d+$", "", n)))
    print(f"  the {top} largest groups of ops (shared time per call):", flush=True)
    for label, t in groups.most_common(top):
      print(f"    {1e-3 * t / iters:8.2f} ms {100e-6 * t / iters / busy:5.1f}%  {label}", flush=True)
  return shared


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
  lowered = step.lower(state, batch, rng)
  num_flops = flops(lowered)
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], batch, rng)
    return metrics["loss"]

  report(name, median_seconds(run, iters), items, unit, num_flops, peak_gflops)
  if profile:
    op_breakdown(run, iters, hlo_text=lowered.compile().as_text())
