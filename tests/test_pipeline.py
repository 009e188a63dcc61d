"""End-to-end tests of sbmae.pipeline on the quick config (tiny sizes, 2 steps).
"""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import polymnist as polymnist_config
from sbmae import errors
from sbmae import pipeline
from sbmae import rundir
from sbmae import system
from sbmae import training
from sbmae.tools import ae_ceiling
from sbmae.tools import rank_sweep


def test_two_step_pipeline_writes_every_output(tmp_path, tiny_config):
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
  # The prior's held-out (test latents) and training denoising loss per k, in
  # the JSON log and in TensorBoard.
  held_out = json.loads((tmp_path / "prior" / "eval_metrics.json").read_text())
  assert [row["step"] for row in held_out] == [2]
  for k in range(5):
    assert np.isfinite(held_out[0][f"heldout_k{k}"]) and held_out[0][f"heldout_k{k}"] > 0
    assert np.isfinite(held_out[0][f"train_k{k}"])
  events = b"".join(p.read_bytes() for p in (tmp_path / "tb").glob("events.out.tfevents.*"))
  assert b"prior/eval/heldout_k4" in events and b"prior/train/share_k4" in events
  # The saved run can be loaded and used by other code.
  mm = system.load(tmp_path)
  batch = {"m1": np.full((3, 28, 28, 3), 0.5, np.float32)}
  out = mm.generate(jax.random.PRNGKey(0), batch, observed=["m1"])
  assert set(out) == set(mm.names) and out["m0"].shape == (3, 28, 28, 3)
  assert np.all(np.isfinite(out["m4"]))
  # A run saved before `sampling.joint_guidance` existed loads with its own sampler (v = 0).
  unguided = rundir.RunDir(tmp_path).load_config()
  unguided.sampling.joint_guidance = 0.0
  old = rundir.RunDir(tmp_path).load_config()
  del old.sampling["joint_guidance"]
  outputs = [system.load(tmp_path, c).generate(jax.random.PRNGKey(0), batch, observed=["m1"])
             for c in (unguided, old, None)]
  np.testing.assert_array_equal(outputs[1]["m4"], outputs[0]["m4"])
  assert not np.array_equal(outputs[2]["m4"], outputs[0]["m4"])  # the saved v = 1 differs

  # ae_ceiling retrains the autoencoders exactly as the stage did (same test MSE), scores
  # them with the run's classifiers and leaves the run folder as it was.
  files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  config = tiny_config()
  everything = ae_ceiling.measure(config, tmp_path, None, num_examples=64)
  stage_mse = json.loads((tmp_path / "autoencoders" / "test_reconstruction.json").read_text())
  for name, mse in stage_mse.items():
    np.testing.assert_allclose(everything[f"test_mse_{name}"], mse, rtol=1e-5)
  one = ae_ceiling.measure(config, tmp_path, ["m3"], num_examples=20)
  assert sorted(one) == ["num_examples", "reconstruction_m3", "test_mse_m3", "train_s"]
  assert one["num_examples"] == 20 and 0.0 <= one["reconstruction_m3"] <= 1.0
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == files
  with pytest.raises(errors.ConfigError, match=r"--modalities: \['m7'\] not in"):
    ae_ceiling.measure(config, tmp_path, ["m3", "m7"])


def test_classifier_is_trained_once_per_data_and_settings(tmp_path, monkeypatch, tiny_config):
  config = tiny_config(classifier=3)
  config.stage = "classifier"
  config.classifier.cache_dir = str(tmp_path / "cache")
  pipeline.train_and_evaluate(config, tmp_path / "first")
  cached = list((tmp_path / "cache").iterdir())
  assert len(cached) == 1 and (tmp_path / "first" / "classifier" / "checkpoints").is_symlink()
  accuracy = (tmp_path / "first" / "classifier" / "test_accuracy.json").read_text()

  def no_training(state, batch, rng):
    raise AssertionError("trained again despite the cache")
  monkeypatch.setattr(training, "make_train_step", lambda *args, **kwargs: no_training)
  pipeline.train_and_evaluate(config, tmp_path / "second")  # loads the cached classifier
  assert (tmp_path / "second" / "classifier" / "test_accuracy.json").read_text() == accuracy
  monkeypatch.undo()
  config.classifier.learning_rate *= 2  # other settings: another classifier.
  pipeline.train_and_evaluate(config, tmp_path / "third")
  assert len(list((tmp_path / "cache").iterdir())) == 2


def test_bad_config_values_are_named(tiny_config):
  config = tiny_config()
  config.stage = "priors"
  with pytest.raises(ValueError, match="config.stage='priors'"):
    pipeline.train_and_evaluate(config, "/tmp/unused")
  with pytest.raises(ValueError, match=r"unknown config argument\(s\) \['fast'\]"):
    polymnist_config.get_config("quick,fast")
  # The sampler must not ask for what the prior was not trained on.
  config = tiny_config()
  errors.validate_config(config)
  config.prior.clean_count_dist = "none"
  with pytest.raises(ValueError, match="clean_conditioning"):
    errors.validate_config(config)
  config.sampling.clean_conditioning = False
  with pytest.raises(ValueError, match="guidance"):
    errors.validate_config(config)
  config.sampling.guidance = 0.0
  with pytest.raises(ValueError, match="joint_guidance"):
    errors.validate_config(config)
  config.sampling.joint_guidance = 0.0
  errors.validate_config(config)


def test_unknown_config_key_on_the_command_line_is_named(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sbmae.main", "--config=configs/polymnist.py:quick",
       f"--workdir={tmp_path}", "--config.prior.num_step=3"],
      capture_output=True, text=True, timeout=120, check=False,
      cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode != 0
  assert "num_step" in result.stderr and 'Did you mean "num_steps"' in result.stderr
  assert not (tmp_path / "data").exists()  # stopped before doing any work


def test_full_vs_reduced_launcher_shares_stages_and_compares(tmp_path, tiny):
  repo = pathlib.Path(__file__).resolve().parents[1]
  overrides = {**tiny, "reduction.max_steps": 20, "reduction.batch_size": 64,
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
       f"--workdir={tmp_path / 'reduced'}", "--epsilons=10,0.1,0.0001",
       "--ceiling_tolerance=1.0", *tiny],
      capture_output=True, text=True, timeout=300, check=False, cwd=repo)
  assert result.returncode == 0, result.stderr[-3000:]
  sweep = json.loads((tmp_path / "reduced" / "reduce" / "rank_sweep.json").read_text())
  rows = sweep["rows"]
  # Any ceiling is within 1.0 of the full one: the smallest rank is chosen.
  assert sweep["choice"] == rows[0]
  assert [r["epsilon"] for r in rows] == [10, 0.1, 0.0001, None]
  totals = [r["total_rank"] for r in rows]
  assert totals == sorted(totals) and totals[-1] == 5 * 16
  assert all(r["estimated_kl_bound"] < r["epsilon"] for r in rows[:-1])
  assert all(0.0 <= r["reconstruction_mean"] <= 1.0 for r in rows)
  assert (tmp_path / "reduced" / "reduce" / "rank_sweep.png").exists()


def test_choose_by_ceiling_takes_the_smallest_rank_that_keeps_enough():
  rows = [{"epsilon": 1.0, "total_rank": 10, "reconstruction_mean": 0.5},
          {"epsilon": 0.1, "total_rank": 40, "reconstruction_mean": 0.86},
          {"epsilon": 0.01, "total_rank": 70, "reconstruction_mean": 0.89},
          {"epsilon": None, "total_rank": 80, "reconstruction_mean": 0.9}]
  assert rank_sweep.choose_by_ceiling(rows, 0.05)["epsilon"] == 0.1
  assert rank_sweep.choose_by_ceiling(rows, 0.02)["epsilon"] == 0.01
  assert rank_sweep.choose_by_ceiling(rows, 0.001) is None
