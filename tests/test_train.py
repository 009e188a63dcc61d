"""End-to-end tests of the pipeline on the quick config (tiny sizes, 2 steps)."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import polymnist as polymnist_config
from sbmae import pipeline
from sbmae import rundir
from sbmae import system
from sbmae import training
from sbmae.stages import autoencoders


# Tiny sizes for the quick config, as dotted config keys (also passed as
# --config.KEY=VALUE flags to the command-line tools).
TINY = {
    "data.num_train": 256, "data.num_test": 64, "log_every": 1, "checkpoint_every": 1,
    "classifier.num_steps": 2, "classifier.batch_size": 16,
    "autoencoder.widths": (8, 8, 8), "autoencoder.latent_dim": 16,
    "autoencoder.num_steps": 2, "autoencoder.batch_size": 16,
    "prior.hidden": 32, "prior.num_layers": 1, "prior.num_steps": 2, "prior.batch_size": 16,
    "sampling.num_steps": 3, "sampling.batch_size": 8,
    "eval.num_examples": 8, "eval.num_unconditional": 8, "eval.grid_examples": 2,
    "eval.max_subsets": 2,
}


def tiny_config(**stage_steps):
  config = polymnist_config.get_config("quick")
  for key, value in TINY.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  for stage, steps in stage_steps.items():
    config[stage].num_steps = steps
  return config


def test_two_step_pipeline_writes_every_output(tmp_path):
  pipeline.train_and_evaluate(tiny_config(), tmp_path)
  for name in ("data_examples.png", "config.json", "classifier/test_accuracy.json",
               "autoencoders/latents.npz", "autoencoders/reconstructions.png",
               "eval/metrics.json", "eval/unconditional.png", "eval/reconstruction.png",
               "stage_times.json"):
    assert (tmp_path / name).exists(), name
  # One grid for the first evaluated subset of sizes 1, M/2 = 2 and M - 1 = 4.
  grids = sorted(p.name for p in (tmp_path / "eval").glob("conditional_given_*.png"))
  assert sorted(g.count("+") for g in grids) == [0, 1, 3], grids
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
  result = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
  for k in range(1, 5):
    assert 0.0 <= result[f"coherence/conditional_k{k}"] <= 1.0
  assert {f"fd_clf/m{k}" for k in range(5)} <= set(result)
  assert all(0.0 <= result[f"coherence/reconstruction_m{k}"] <= 1.0 for k in range(5))
  assert np.isfinite(result["fd_clf/m0"])
  # The saved run can be loaded and used by other code.
  mm = system.load(tmp_path)
  batch = {"m1": np.full((3, 28, 28, 3), 0.5, np.float32)}
  out = mm.generate(jax.random.PRNGKey(0), batch, observed=["m1"])
  assert set(out) == set(mm.names) and out["m0"].shape == (3, 28, 28, 3)
  assert np.all(np.isfinite(out["m4"]))


class _Interrupt(Exception):
  pass


def test_kill_and_resume_gives_the_same_parameters(tmp_path, monkeypatch):
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


def test_non_finite_loss_names_the_step(tmp_path):
  config = tiny_config(autoencoder=6)
  config.stage = "autoencoders"
  config.autoencoder.update(learning_rate=1e30, grad_clip=0.0, warmup_steps=0)
  with pytest.raises(training.NonFiniteLossError,
                     match=r"\[autoencoders\] non-finite .* at step \d"):
    pipeline.train_and_evaluate(config, tmp_path)


def test_bad_config_values_are_named():
  config = tiny_config()
  config.stage = "priors"
  with pytest.raises(ValueError, match="config.stage='priors'"):
    pipeline.train_and_evaluate(config, "/tmp/unused")
  with pytest.raises(ValueError, match=r"unknown config argument\(s\) \['fast'\]"):
    polymnist_config.get_config("quick,fast")


def test_unknown_config_key_on_the_command_line_is_named(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sbmae.main", "--config=configs/polymnist.py:quick",
       f"--workdir={tmp_path}", "--config.prior.num_step=3"],
      capture_output=True, text=True, timeout=120, check=False,
      cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode != 0
  assert "num_step" in result.stderr and 'Did you mean "num_steps"' in result.stderr
  assert not (tmp_path / "data").exists()  # stopped before doing any work


def test_full_vs_reduced_launcher_shares_stages_and_compares(tmp_path):
  repo = pathlib.Path(__file__).resolve().parents[1]
  overrides = {**TINY, "reduction.max_steps": 20, "reduction.batch_size": 64,
               "eval.max_subsets": 1}
  tiny = [f"--config.{key}={value}" for key, value in overrides.items()]
  result = subprocess.run(
      ["bash", "launch/full_vs_reduced.sh", "configs/polymnist.py:quick", str(tmp_path), *tiny],
      capture_output=True, text=True, timeout=600, check=False, cwd=repo)
  assert result.returncode == 0, result.stderr[-3000:]
  for shared in ("data", "classifier", "autoencoders"):  # trained once, linked
    assert (tmp_path / "reduced" / shared).is_symlink()
  assert (tmp_path / "reduced" / "reduce" / "reduction.json").exists()
  assert not (tmp_path / "full" / "reduce").exists()
  table = (tmp_path / "compare" / "table.md").read_text().splitlines()
  assert table[2].startswith("| full | full | - |")
  ranks = json.loads((tmp_path / "reduced" / "reduce" / "reduction.json").read_text())["ranks"]
  assert table[3].startswith(f"| reduced | {sum(ranks)} (")
  assert (tmp_path / "compare" / "coherence.png").exists()

  # Re-choosing ranks without refitting: more dims as epsilon shrinks, full last.
  result = subprocess.run(
      [sys.executable, "-m", "sbmae.tools.rank_sweep", "--config=configs/polymnist.py:quick,reduce",
       f"--workdir={tmp_path / 'reduced'}", "--epsilons=10,0.1,0.0001", *tiny],
      capture_output=True, text=True, timeout=300, check=False, cwd=repo)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads((tmp_path / "reduced" / "reduce" / "rank_sweep.json").read_text())
  assert [r["epsilon"] for r in rows] == [10, 0.1, 0.0001, None]
  totals = [r["total_rank"] for r in rows]
  assert totals == sorted(totals) and totals[-1] == 5 * 16
  assert all(r["kl_bound"] < r["epsilon"] for r in rows[:-1])
  assert all(0.0 <= r["reconstruction_mean"] <= 1.0 for r in rows)
  assert (tmp_path / "reduced" / "reduce" / "rank_sweep.png").exists()
