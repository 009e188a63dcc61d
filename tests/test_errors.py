"""Bad input gives a named error (sbmae.errors), exits non-zero, and leaves nothing trusted.

One row per input a user gives: data files, config values, the run folder,
arrays handed to the library. Most cases stop before any work; the two CLI
cases run `python -m sbmae.main` to check the exit status and the message.
"""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from sbmae import errors
from sbmae import latents as latents_lib
from sbmae import pipeline
from sbmae import rundir
from sbmae import system
from sbmae import training
from sbmae.data import mnist
from sbmae.data import polymnist
from sbmae.data import registry
from sbmae.reduction import reduction
from sbmae.stages import autoencoders
from sbmae.stages import prior

REPO = pathlib.Path(__file__).resolve().parents[1]
REAL_MNIST = REPO.parent / "shared" / "data" / "mnist.npz"


@pytest.fixture
def cli(tiny):
  """cli(workdir, *flags): `python -m sbmae.main` on the quick config at TINY sizes."""
  def run(workdir, *flags):
    return subprocess.run(
        [sys.executable, "-m", "sbmae.main", "--config=configs/polymnist.py:quick",
         f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in tiny.items()], *flags],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
  return run


def _truncated_mnist(tmp_path):
  bad = tmp_path / "bad.npz"
  if REAL_MNIST.exists():
    bad.write_bytes(REAL_MNIST.read_bytes()[:1000])
  else:  # the same damage to a small Keras-style file
    good = tmp_path / "good.npz"
    np.savez_compressed(good, x_train=np.zeros((10, 28, 28), np.uint8),
                        y_train=np.arange(10), x_test=np.zeros((2, 28, 28), np.uint8),
                        y_test=np.arange(2))
    data = good.read_bytes()
    bad.write_bytes(data[:len(data) // 2])  # it compresses to under 1,000 bytes
  return bad


def test_truncated_mnist_on_the_command_line_is_named(tmp_path, cli):
  bad = _truncated_mnist(tmp_path)
  result = cli(tmp_path / "run", "--config.data.digits=mnist",
                f"--config.data.mnist_path={bad}")
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("sbmae: DataError: ") and str(bad) in last, last
  assert "Traceback" not in result.stderr and "mnist_path" in last
  assert not list((tmp_path / "run").glob("data/*.npz"))  # no cache a rerun would trust


def test_stage_without_its_inputs_on_the_command_line_is_named(tmp_path, cli):
  result = cli(tmp_path / "run", "--config.stage=prior")
  assert result.returncode == 1
  assert ("StageOrderError: stage prior needs the autoencoders stage: run it first "
          "(or drop --config.stage)") in result.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage,needs", [("reduce", "autoencoders"), ("evaluate", "classifier"),
                                         ("prior", "autoencoders")])
def test_stage_order(tmp_path, stage, needs, tiny_config):
  config = tiny_config()
  config.stage = stage
  config.reduction.enabled = True
  with pytest.raises(errors.StageOrderError, match=f"stage {stage} needs the {needs} stage"):
    pipeline.train_and_evaluate(config, tmp_path)
  assert not tmp_path.joinpath("config.json").exists()


def _set(config, key, value):
  section, _, field = key.rpartition(".")
  (config[section] if section else config)[field] = value
  return config


@pytest.mark.parametrize("key,value", [
    ("reduction.epsilon", -1.0), ("reduction.epsilon", float("nan")),
    ("prior.num_steps", -5), ("classifier.batch_size", 0), ("prior.absent_prob", 1.5),
    ("prior.ema_decay", -0.1), ("eval.max_subsets", 0), ("data.num_train", 0),
    ("reduction.held_out_fraction", 1.0), ("sampling.eps", float("inf")),
    ("log_every", 0), ("autoencoder.kind", "gan"), ("sde.beta_max", 0.05),
    ("reduction.max_rank", 0), ("data.num_modalities", 1), ("stage", "priors"),
])
def test_config_values_out_of_range_are_named(tmp_path, key, value, tiny_config):
  config = _set(tiny_config(), key, value)
  config.reduction.min_rank = 1
  with pytest.raises(errors.ConfigError, match=rf"config\.{key}="):
    pipeline.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()  # checked before anything is written


def test_workdir_of_another_config_is_refused_unless_asked(tmp_path, tiny_config):
  config = tiny_config()
  run = rundir.RunDir(tmp_path)
  run.save_config(config)
  run.stage("autoencoders").mkdir()  # the autoencoders stage has started here
  saved = run.config.read_text()
  other = tiny_config()
  other.autoencoder.latent_dim = 8
  other.log_every = 7  # may differ: logging only
  with pytest.raises(errors.RunMismatchError,
                     match=r"autoencoder\.latent_dim: 16 there, 8 now.*allow_config_change"):
    pipeline.train_and_evaluate(other, tmp_path)
  assert run.config.read_text() == saved
  # Keys of stages that have not started (the prior's) may change.
  later = tiny_config()
  later.prior.hidden = 64
  assert not errors.config_differences(config, later, ["autoencoders"])
  assert errors.config_differences(config, later, ["autoencoders", "prior"])
  other.allow_config_change = True
  assert errors.check_same_run(config, other, ["autoencoders"], run.config)


def test_bad_mnist_files_are_named(tmp_path):
  bad = _truncated_mnist(tmp_path)
  with pytest.raises(errors.DataError, match=f"{bad}.*truncated"):
    mnist.load_mnist(str(bad))
  x = np.zeros((20, 28, 28), np.uint8)
  y = np.arange(20) % 10
  cases = {
      "shape": dict(x_train=np.zeros((20, 20, 28), np.uint8), y_train=y, x_test=x, y_test=y),
      "dtype": dict(x_train=x.astype(np.float32), y_train=y, x_test=x, y_test=y),
      "classes": dict(x_train=x, y_train=y * 0 + 4, x_test=x, y_test=y),
      "labels": dict(x_train=x, y_train=y + 5, x_test=x, y_test=y),
      "keys": dict(x_train=x, y_train=y),
  }
  messages = {"shape": r"not \[N, 28, 28\]", "dtype": "dtype float32",
              "classes": r"only digit\(s\) \[4\]", "labels": "integers 0..9",
              "keys": "missing arrays"}
  for name, arrays in cases.items():
    np.savez(tmp_path / f"{name}.npz", **arrays)
    with pytest.raises(errors.DataError, match=messages[name]):
      mnist.load_mnist(str(tmp_path / f"{name}.npz"))
  with pytest.raises(mnist.MnistNotFoundError) as info:
    mnist.load_mnist(str(tmp_path / "nowhere.npz"))
  assert isinstance(info.value, (errors.DataError, FileNotFoundError))
  (tmp_path / "idx").mkdir()
  (tmp_path / "idx" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00")
  for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
    (tmp_path / "idx" / name).write_bytes(b"")
  with pytest.raises(errors.DataError, match="train-images-idx3-ubyte"):
    mnist.load_mnist(str(tmp_path / "idx"))


def test_too_small_background_and_existing_errors_join_the_hierarchy(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for i in range(2):
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / f"{i}.png")
  with pytest.raises(errors.DataError, match="smaller than 28x28"):
    polymnist.load_backgrounds(str(tmp_path), 2)
  assert issubclass(polymnist.PolyMnistError, ValueError)
  assert issubclass(training.NonFiniteLossError, FloatingPointError)
  assert issubclass(training.NonFiniteLossError, errors.NonFiniteError)
  assert issubclass(errors.StageOrderError, FileNotFoundError)


def _whitened(seed=0, n=200):
  rs = np.random.RandomState(seed)
  return {"a": rs.randn(n, 3).astype(np.float32), "b": rs.randn(n, 2).astype(np.float32)}


def test_reduction_fit_refuses_bad_arguments_up_front():
  rng = jax.random.PRNGKey(0)
  z = _whitened()
  z["b"][17, 1] = np.nan
  with pytest.raises(errors.NonFiniteError, match=r"modality 'b'.*row 17"):
    reduction.fit(z, epsilon=0.5, rng=rng)
  for eps in (-1.0, float("nan"), 0.0):
    with pytest.raises(errors.ConfigError, match=r"reduction\.epsilon"):
      reduction.fit(_whitened(), epsilon=eps, rng=rng)
  with pytest.raises(errors.DataError, match="different sample counts"):
    reduction.fit({"a": _whitened()["a"], "b": _whitened()["b"][:50]}, epsilon=0.5, rng=rng)
  with pytest.raises(errors.ConfigError, match=r"reduction\.max_steps"):
    reduction.fit(_whitened(), epsilon=0.5, rng=rng,
                  config={"parametrisation": "mlp", "max_steps": 0})


def test_reduction_max_steps_zero_is_the_linear_fit_alone():
  rs = np.random.RandomState(1)
  shared = rs.randn(600, 1)
  z = {"a": np.concatenate([shared + 0.3 * rs.randn(600, 1), rs.randn(600, 2)], 1),
       "b": np.concatenate([shared + 0.3 * rs.randn(600, 1), rs.randn(600, 2)], 1)}
  z = {n: ((v - v.mean(0)) / v.std(0)).astype(np.float32) for n, v in z.items()}
  red = reduction.fit(z, epsilon=0.1, rng=jax.random.PRNGKey(0), config={"max_steps": 0})
  assert red.stats["train_steps"] == 0
  assert red.stats["held_out_objective"] == pytest.approx(
      red.stats["linear_held_out_objective"], rel=1e-5)
  assert red.ranks["a"] >= 1 and np.isfinite(red.estimated_kl_bound)


@pytest.fixture(scope="module")
def untrained_model(tiny_config):
  """A MultimodalModel with freshly initialised parameters (shapes are what count)."""
  config = tiny_config()
  config.data.num_modalities = 2
  mods = registry.get(config.data).modalities(config.data)
  models, _, ae_state = autoencoders.init_state(config, mods)
  dims = [config.autoencoder.latent_dim] * len(mods)
  d = dims[0]
  identity = {m.name: np.eye(d, dtype=np.float32) for m in mods}
  stats = latents_lib.Whitening({m.name: np.zeros(d, np.float32) for m in mods},
                                identity, identity)
  sde, _, score_fn, _, p_state = prior._init(config, dims)  # pylint: disable=protected-access
  return system.MultimodalModel(mods, models, ae_state.params, stats, None, sde, score_fn,
                                p_state.ema_params, config.sampling)


def test_generate_refuses_wrong_shapes(untrained_model):
  mm, rng = untrained_model, jax.random.PRNGKey(0)
  with pytest.raises(errors.DataError, match=r"modality 'm0': got float32 \[4, 20, 28, 3\], "
                                             r"expected \[B, 28, 28, 3\]"):
    mm.generate(rng, {"m0": np.zeros((4, 20, 28, 3), np.float32)}, observed=["m0"])
  with pytest.raises(errors.DataError, match=r"lacks the observed modalities \['m1'\]"):
    mm.generate(rng, {"m0": np.zeros((4, 28, 28, 3), np.float32)}, observed=["m1"])
  with pytest.raises(errors.DataError, match="different batch sizes"):
    mm.generate(rng, {"m0": np.zeros((4, 28, 28, 3), np.float32),
                      "m1": np.zeros((3, 28, 28, 3), np.float32)}, observed=["m0", "m1"])
  images = np.zeros((4, 28, 28, 3), np.float32)
  images[2, 0, 0, 0] = np.inf
  with pytest.raises(errors.NonFiniteError, match="modality 'm0' of the batch: row 2"):
    mm.generate(rng, {"m0": images}, observed=["m0"])
  out = mm.generate(rng, {"m0": np.zeros((2, 28, 28, 3), np.float32)}, observed=["m0"])
  assert out["m1"].shape == (2, 28, 28, 3)


def test_non_finite_latents_are_named():
  z = np.ones((5, 3), np.float32)
  z[3, 2] = np.nan
  with pytest.raises(errors.NonFiniteError, match="latents of 'm0': row 3"):
    errors.check_finite_rows(z, "latents of 'm0'")
  errors.check_finite_rows(np.ones((5, 3)), "fine")
