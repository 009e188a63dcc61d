"""Pieces every training stage shares: state, optimiser, checkpoints, the loop.

A stage provides an initial `TrainState`, a jitted `train_step(state, batch, rng)
-> (state, metrics)` and a `batch_fn(step) -> batch`; `run` does the rest:
restore-latest-or-init from the stage's Orbax checkpoints, per-step keys from
`fold_in(base, step)` (so a resumed run is bit-identical), progress with
steps/s and ETA, metrics, a stop on a non-finite loss naming the step, and
checkpoints every `checkpoint_every` steps and at the end.
"""

import functools
import json
import pathlib
import time
from typing import Any, Callable

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sbmae import errors
from sbmae import faults


class NonFiniteLossError(errors.NonFiniteError):
  """A training loss became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
  """Parameters, optimiser state and (optionally) an EMA of the parameters."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None

  @classmethod
  def create(cls, params, tx, ema=False):
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               opt_state=tx.init(params),
               ema_params=jax.tree.map(jnp.copy, params) if ema else None)

  def apply_gradients(self, grads, tx, ema_decay=None):
    """One optimiser update (and EMA update when this state keeps one)."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema = self.ema_params
    if ema is not None:
      ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state,
                        ema_params=ema)


def make_train_step(loss_fn, tx, ema_decay=None, compiler_options=None):
  """Jitted, state-donating (state, batch, rng) -> (state, metrics).

  Args:
    loss_fn: (params, rng, batch) -> (loss, metrics).
    tx: the optax optimiser.
    ema_decay: EMA decay when the state keeps an EMA of the parameters.
    compiler_options: XLA options of this step's compilation (conv nets pass
      `sbmae.models.conv.compiler_options()`), or None.
  """

  @functools.partial(jax.jit, donate_argnums=0, compiler_options=compiler_options)
  def train_step(state, batch, rng):
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, rng, batch)
    return state.apply_gradients(grads, tx, ema_decay), metrics

  return train_step


def make_optimizer(learning_rate, num_steps, *, warmup_steps=0, grad_clip=0.0,
                   weight_decay=0.0):
  """Adam(W) with linear warm-up, cosine decay and optional global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(1, min(warmup_steps, num_steps - 1)), max(2, num_steps),
      end_value=0.1 * learning_rate)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(schedule, weight_decay=weight_decay))
  return optax.chain(*parts)


def checkpoint_manager(directory, max_to_keep=2):
  """An Orbax CheckpointManager over `directory` (a stage's `RunDir.checkpoints`)."""
  return ocp.CheckpointManager(
      pathlib.Path(directory).absolute(),
      # A killed save leaves only a temporary folder, which Orbax never restores
      # from; cleaning them up keeps the folder tidy.
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           cleanup_tmp_directories=True))


def restore_latest(manager, target):
  """Restores the latest checkpoint into `target`'s structure, or returns None."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def data_mesh(devices=None):
  """A 1-D mesh over all devices (of all processes) with axis `data`."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def replicate(tree, mesh):
  """Places every leaf of `tree` on all devices of `mesh` (parameters, opt state).

  Every process passes the same values (same seed, or the same checkpoint);
  going through the host also works across processes on backends without
  cross-host device transfers (CPU).
  """
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_batch(batch, mesh):
  """Assembles per-process host batches into global arrays split along `data`.

  Each process passes its own part of the global batch (leading axis
  global_batch / process_count), as the per-host pipeline yields it.
  """
  sharding = NamedSharding(mesh, P("data"))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def shard_local(batch, replicated=()):
  """Splits `batch` along its leading axis over this process's devices.

  For work every process repeats on its own (evaluation, sampling for
  pictures). `replicated` (parameters, keys) are copied to the same devices so
  one jitted call can take them all. A batch that does not split evenly stays
  on the default device.

  Returns:
    (batch, replicated) placed on the local devices.
  """
  devices = jax.local_devices()
  if len(devices) == 1 or batch.shape[0] % len(devices):
    return batch, replicated
  mesh = data_mesh(devices)
  return (jax.device_put(batch, NamedSharding(mesh, P("data"))),
          jax.device_put(replicated, NamedSharding(mesh, P())))


def per_process_batch(global_batch, mesh=None):
  """This process's share of `global_batch`; checks it splits over the mesh."""
  mesh = data_mesh() if mesh is None else mesh
  if global_batch % mesh.size:
    raise errors.ConfigError(f"batch size {global_batch} is not divisible by the "
                             f"{mesh.size} devices of the data mesh; choose a multiple")
  return global_batch // jax.process_count()


def restore_stage(directory, stage, target):
  """The latest state of a trained stage; StageOrderError naming it if none.

  Args:
    directory: the stage's checkpoint folder (`RunDir.checkpoints(stage)`).
    stage: the stage's name, for the message.
    target: a freshly initialised state giving the structure.
  """
  state = restore_latest(checkpoint_manager(directory), target)
  if state is None:
    raise errors.StageOrderError(f"no checkpoint in {directory}; run the `{stage}` stage "
                                 "first (or drop --config.stage)")
  return state


def restore_params(directory, stage, params):
  """Only the parameters of a trained stage's latest checkpoint.

  Reads the `params` entry alone, so the optimiser state may have any structure
  (checkpoints written before a change of optimiser still load).

  Args:
    directory: the stage's checkpoint folder (`RunDir.checkpoints(stage)`).
    stage: the stage's name, for the message.
    params: freshly initialised parameters giving the structure.
  """
  manager = checkpoint_manager(directory)
  step = manager.latest_step()
  if step is None:
    raise errors.StageOrderError(f"no checkpoint in {directory}; run the `{stage}` stage "
                                 "first (or drop --config.stage)")
  abstract = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, params)}
  return manager.restore(step, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True))["params"]


class Progress:
  """Logs steps/s and ETA every `every` steps (and at the last step).

  The rate is that of the steps since the previous log line, and the ETA uses
  a moving average of it (weight 0.3 on the newest window), so it follows a
  stage whose steps get cheaper (autoencoders that stop early) or dearer
  instead of the mean since the start.
  """

  def __init__(self, name, total, start=0, every=100):
    self.name, self.total, self.every = name, total, every
    self._t, self._s = time.perf_counter(), start
    self._sec_per_step = None

  def __call__(self, step, metrics=None):
    """Logs when `step` (1-based count of finished steps) is due."""
    if step % self.every and step != self.total:
      return
    now = time.perf_counter()
    window = max(now - self._t, 1e-9) / max(step - self._s, 1)
    self._t, self._s = now, step
    self._sec_per_step = window if self._sec_per_step is None else (
        0.7 * self._sec_per_step + 0.3 * window)
    text = " ".join(f"{k}={float(v):.4g}" for k, v in sorted((metrics or {}).items()))
    logging.info("[%s] step %d/%d  %.2f steps/s  ETA %s  %s", self.name, step,
                 self.total, 1.0 / window, _hms((self.total - step) * self._sec_per_step), text)


def _hms(seconds):
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def check_finite(metrics, step, name):
  """Raises NonFiniteLossError naming the stage and step if any metric is not finite."""
  bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
  if bad:
    raise NonFiniteLossError(f"[{name}] non-finite {bad} at step {step}; "
                             "lower the learning rate or check the inputs")


def _eval_history(path, start):
  """Evaluations logged before `start` by an earlier (interrupted) run of the stage."""
  if path is None or not pathlib.Path(path).exists():
    return []
  return [row for row in json.loads(pathlib.Path(path).read_text()) if row["step"] <= start]


def run(name, state, train_step: Callable, batch_fn: Callable, *, num_steps, rng,
        manager, writer=None, log_every=100, checkpoint_every=1000, mesh=None,
        eval_fn=None, eval_every=0, eval_path=None, stop_fn=None):
  """Trains `state` to `num_steps`, resuming from `manager`'s latest checkpoint.

  Args:
    name: stage name (log and metric prefix).
    state: freshly initialised TrainState (used as the restore target).
    train_step: jitted (state, batch, rng) -> (state, metrics dict of scalars).
    batch_fn: step -> this process's part of the global batch (must be a pure
      function of the step for resumes to be exact).
    num_steps: total steps.
    rng: base key; step s uses fold_in(rng, s).
    manager: the stage's CheckpointManager; None for no checkpoints (a fit
      short enough to redo, such as the reduction's score ratio).
    writer: optional `sbmae.metrics.Writer`.
    log_every: steps between progress lines and metric writes.
    checkpoint_every: steps between checkpoints.
    mesh: data-parallel mesh (default: all devices); the state is replicated
      and every batch split along its `data` axis, so XLA all-reduces the
      gradients and the global batch does not depend on the device count.
    eval_fn: optional state -> dict of floats (e.g. held-out losses), run
      every `eval_every` steps and at the end; logged, written under
      `{name}/eval` and appended to the JSON file `eval_path` (a list of
      {"step": s, **metrics}, kept across resumes).
    eval_every: steps between evaluations (0: none).
    eval_path: the JSON history file of `eval_fn` (from the stage's RunDir).
    stop_fn: optional history -> bool, asked after every evaluation; True
      ends training there (early stopping).

  Returns:
    The final TrainState.
  """
  mesh = data_mesh() if mesh is None else mesh
  restored = None if manager is None else restore_latest(manager, state)
  if restored is not None:
    state = restored
    logging.info("[%s] resumed at step %d", name, int(state.step))
  state = replicate(state, mesh)
  start = int(state.step)
  progress = Progress(name, num_steps, start, log_every)
  pending = []
  evaluate = eval_fn is not None and eval_every > 0
  history = _eval_history(eval_path, start) if evaluate else []
  try:
    for step in range(start, num_steps):
      batch = shard_batch(batch_fn(step), mesh)
      state, metrics = train_step(state, batch, jax.random.fold_in(rng, step))
      pending.append(metrics)
      done = step + 1
      faults.point(f"{name}:{done}")
      log_now = done % log_every == 0 or done == num_steps
      save_now = done % checkpoint_every == 0 or done == num_steps
      if log_now or save_now:
        # Fetching metrics synchronises with the device, so only here; every step
        # is checked before a checkpoint can store a non-finite state.
        host = jax.device_get(pending)
        pending = []
        for i, m in enumerate(host):
          check_finite(m, done - len(host) + i + 1, name)
        # A metric may be missing from some steps (a modality that stopped training).
        mean = {k: float(np.mean([m[k] for m in host if k in m])) for k in host[-1]}
        if log_now:
          progress(done, mean)
          if writer is not None:
            writer.scalars(done, mean, prefix=f"{name}/train")
      if evaluate and (done % eval_every == 0 or done == num_steps):
        values = eval_fn(state)
        check_finite(values, done, name)
        logging.info("[%s] eval at step %d: %s", name, done,
                     " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
        history.append({"step": done, **values})
        if writer is not None:
          writer.scalars(done, values, prefix=f"{name}/eval")
          if eval_path is not None:
            writer.json(eval_path, history)
        if stop_fn is not None and stop_fn(history):
          logging.info("[%s] stopped early at step %d", name, done)
          break
      if save_now and manager is not None:
        manager.save(done, args=ocp.args.StandardSave(state))
        faults.point(f"{name}:save:{done}")
  finally:
    # An interrupted run still completes the checkpoint it had started.
    if manager is not None:
      manager.wait_until_finished()
  return state

