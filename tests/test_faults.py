"""The fault matrix: kill -9 inside every stage, re-run the same command, get the same numbers.

One uninterrupted reference run (module fixture) and one chain of killed runs in
another workdir, all `python -m sbmae.main` subprocesses on the tiny quick
config with the reduction on (2 modalities, 3 steps per trained stage,
checkpoints every step). Each run of the chain is killed by SIGKILL at a seeded
random kill point (`sbmae.faults.point`) of the next stage: while the data
cache is written, at a step or during an Orbax save of the classifier, the
autoencoders (or between their two latent files), the prior, while the
reduction is saved, and during evaluation. Each re-run must resume from what
the killed one left; the last run is not killed and its metrics.json must
equal the reference's bit for bit.

Chaining keeps the matrix cheap (about one pipeline plus a process start per
kill, instead of one pipeline per kill). The processes share a JAX compilation
cache: it holds compiled programs only, no run state, so every kill point keeps
its meaning (the test checks that each killed run really died by SIGKILL).
SBMAE_FAULT_SEED=N picks other kill points.
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys

import pytest

from sbmae import faults

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3


def _training_points(stage, extra=()):
  return ([f"{stage}:{s}" for s in range(1, STEPS + 1)]
          + [f"{stage}:save:{s}" for s in range(1, STEPS + 1)] + list(extra))


# Stage -> its kill points (see sbmae.faults).
POINTS = {
    "data": ["data:write"],
    "classifier": _training_points("classifier"),
    "autoencoders": _training_points("autoencoders", ["autoencoders:latents"]),
    "reduce": ["reduce:summary"],
    "prior": _training_points("prior"),
    "evaluate": ["evaluate:k1"],
}


@pytest.fixture(scope="module")
def flags(tiny):
  """The command-line overrides of every run here: TINY, 2 modalities, the reduction."""
  overrides = {**tiny, "data.num_modalities": 2, "eval.max_subsets": 1,
             "classifier.num_steps": STEPS, "autoencoder.num_steps": STEPS,
             "prior.num_steps": STEPS, "reduction.max_steps": 20,
             "reduction.batch_size": 64, "reduction.eval_every": 10}
  return [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def env(xla_flags):
  # The runs share the session's compilation cache (conftest.py) through os.environ.
  out = {k: v for k, v in os.environ.items() if k != faults.ENV_VAR}
  out.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  return out


def _run(workdir, env, flags, fault=None):
  env = dict(env, **({faults.ENV_VAR: fault} if fault else {}))
  return subprocess.run(
      [sys.executable, "-m", "sbmae.main", "--config=configs/polymnist.py:quick,reduce",
       f"--workdir={workdir}", *flags],
      capture_output=True, text=True, timeout=600, check=False, cwd=REPO, env=env)


def _metrics(workdir):
  result = json.loads((workdir / "eval" / "metrics.json").read_text())
  metrics = {k: v for k, v in result["metrics"].items() if not k.startswith("time/")}
  return metrics, result["per_subset"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env, flags):
  workdir = tmp_path_factory.mktemp("reference")
  result = _run(workdir, env, flags)
  assert result.returncode == 0, result.stderr[-3000:]
  return _metrics(workdir)


def test_killed_anywhere_then_rerun_gives_the_same_metrics(tmp_path, env, flags, reference):
  rng = random.Random(int(os.environ.get("SBMAE_FAULT_SEED", "0")))
  chain = [rng.choice(points) for points in POINTS.values()]
  for fault in chain:
    result = _run(tmp_path, env, flags, fault)
    assert result.returncode == -signal.SIGKILL, (
        f"{fault} (chain {chain}) did not kill the run: {result.stderr[-3000:]}")
    # What the killed run was writing is not there under its final name.
    if fault == "data:write":
      assert not list((tmp_path / "data").glob("*.npz")), list((tmp_path / "data").iterdir())
    if fault == "autoencoders:latents":
      assert not (tmp_path / "autoencoders" / "latents.npz").exists()
    if fault == "reduce:summary":
      assert not (tmp_path / "reduce" / "reduction.json").exists()
    if fault.startswith("evaluate"):
      assert not (tmp_path / "eval" / "metrics.json").exists()
  result = _run(tmp_path, env, flags)
  assert result.returncode == 0, f"chain {chain}: {result.stderr[-3000:]}"
  metrics, per_subset = _metrics(tmp_path)
  assert metrics == reference[0], f"chain {chain}"
  assert per_subset == reference[1], f"chain {chain}"
