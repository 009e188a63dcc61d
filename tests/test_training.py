"""Tests of sbmae.training: resume, the NaN guard, periodic evaluation.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sbmae import metrics
from sbmae import pipeline
from sbmae import rundir
from sbmae import training
from sbmae.stages import autoencoders


class _Interrupt(Exception):
  pass


def test_kill_and_resume_gives_the_same_parameters(tmp_path, monkeypatch, tiny_config):
  config = tiny_config(autoencoder=4)
  config.stage = "autoencoders"
  config.checkpoint_every = 2
  pipeline.train_and_evaluate(config, tmp_path / "straight")

  real_run = training.run

  def run_then_die(name, state, train_step, *args, **kwargs):
    calls = []

    def dying_step(state, batch, rng):
      calls.append(1)
      if len(calls) == 3:  # dies during step 3, after the step-2 checkpoint.
        raise _Interrupt()
      return train_step(state, batch, rng)

    return real_run(name, state, dying_step, *args, **kwargs)

  monkeypatch.setattr(training, "run", run_then_die)
  with pytest.raises(_Interrupt):
    pipeline.train_and_evaluate(config, tmp_path / "killed")
  monkeypatch.setattr(training, "run", real_run)
  checkpoints = tmp_path / "killed" / "autoencoders" / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["2"]
  pipeline.train_and_evaluate(config, tmp_path / "killed")  # the same command again

  mods = pipeline.load_data(config, rundir.RunDir(tmp_path / "straight"))[1]
  _, straight, _ = autoencoders.restore(config, rundir.RunDir(tmp_path / "straight"), mods)
  _, resumed, _ = autoencoders.restore(config, rundir.RunDir(tmp_path / "killed"), mods)
  jax.tree.map(np.testing.assert_array_equal, straight, resumed)


def test_non_finite_loss_names_the_step(tmp_path, tiny_config):
  config = tiny_config(autoencoder=6)
  config.stage = "autoencoders"
  config.autoencoder.update(learning_rate=1e30, grad_clip=0.0, warmup_steps=0)
  with pytest.raises(training.NonFiniteLossError,
                     match=r"\[autoencoders\] non-finite .* at step \d"):
    pipeline.train_and_evaluate(config, tmp_path)


def test_eval_history_survives_a_resume(tmp_path):
  """`training.run`'s periodic evaluation: logged every eval_every steps and at
  the end, its JSON history kept when the stage resumes."""
  tx = optax.sgd(0.1)

  def loss_fn(params, rng, batch):
    del rng
    loss = jnp.mean((params["w"] - batch) ** 2)
    return loss, {"loss": loss}

  writer = metrics.Writer(tmp_path / "tb")
  state = training.TrainState.create({"w": jnp.zeros(())}, tx)
  history_path = tmp_path / "toy" / "eval_metrics.json"
  for num_steps in (5, 6):
    training.run("toy", state, training.make_train_step(loss_fn, tx),
                 lambda step: np.ones((4,), np.float32), num_steps=num_steps,
                 rng=jax.random.PRNGKey(0),
                 manager=training.checkpoint_manager(tmp_path / "toy" / "checkpoints"),
                 writer=writer, log_every=1, checkpoint_every=1,
                 eval_fn=lambda s: {"w": float(s.params["w"])}, eval_every=2,
                 eval_path=history_path)
  writer.close()
  history = json.loads(history_path.read_text())
  assert [row["step"] for row in history] == [2, 4, 5, 6]
  # w follows 1 - 0.8^step under SGD on (w - 1)^2.
  np.testing.assert_allclose([row["w"] for row in history],
                             [1 - 0.8 ** s for s in (2, 4, 5, 6)], rtol=1e-5)


def test_progress_rate_follows_the_recent_steps(monkeypatch):
  """steps/s is the last window's; the ETA uses the moving average of windows."""
  clock, lines = [0.0], []
  monkeypatch.setattr(training.time, "perf_counter", lambda: clock[0])
  monkeypatch.setattr(training.logging, "info", lambda fmt, *args: lines.append(args))
  progress = training.Progress("x", total=400, every=50)
  for step in range(1, 201):
    clock[0] += 1.0 if step <= 100 else 0.25  # steps get 4x cheaper halfway
    progress(step)
  assert [args[1] for args in lines] == [50, 100, 150, 200]
  assert [args[3] for args in lines] == pytest.approx([1.0, 1.0, 4.0, 4.0])
  sec_per_step = 0.7 * (0.7 * 1.0 + 0.3 * 0.25) + 0.3 * 0.25
  assert lines[-1][4] == training._hms(200 * sec_per_step)
  assert lines[-1][4] != training._hms(200 * 125 / 200)  # not the mean since the start
