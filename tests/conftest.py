"""Shared test setup: CPU with 4 fake devices, tiny configs, random parameters."""

import atexit
import os
import shutil
import tempfile
import types

# Must happen before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM's optimisation level 1 instead of 2: the tests' programs are tiny and
# most of their time was compilation (on a 2-core AMD machine: the tiny-config
# pipeline of test_pipeline.py 96 -> 69 s; flax's random initialisers of 12
# kernel shapes compile in 1.6 s instead of 33 s, to the same bits;
# test_reduction.py's weak-mixture and private-mode tests 81 / 65 -> 67 / 47
# s). Level 0 compiles faster still but runs the reduction tests slower.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=1")
# One persistent XLA compilation cache for the session, inherited by the
# pipelines the tests start as subprocesses: they compile the same tiny
# programs again and again (on a 2-core AMD machine the full-vs-reduced
# launcher test 275 -> 154 s, kill-and-resume 95 -> 65 s; the whole suite
# 32:47 -> 31:21 min, within that machine's noise). Every program is cached,
# however fast its compilation.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="sbmae_tests_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import polymnist as polymnist_config  # pylint: disable=g-import-not-at-top,wrong-import-position

# Tiny sizes for the quick config, as dotted config keys (also passed as
# --config.KEY=VALUE flags to the command-line tools). The classifier cache is
# off so that tests never share trained networks.
TINY = {
    "data.num_train": 256, "data.num_test": 64, "log_every": 1, "checkpoint_every": 1,
    "classifier.num_steps": 2, "classifier.batch_size": 16, "classifier.cache_dir": "",
    "autoencoder.widths": (8, 8, 8), "autoencoder.latent_dim": 16,
    "autoencoder.num_steps": 2, "autoencoder.batch_size": 16,
    "prior.hidden": 32, "prior.num_layers": 1, "prior.num_steps": 2, "prior.batch_size": 16,
    "sampling.num_steps": 3, "sampling.batch_size": 8,
    "eval.num_examples": 8, "eval.num_unconditional": 8, "eval.grid_examples": 2,
    "eval.max_subsets": 2,
}


@pytest.fixture(scope="session")
def xla_flags():
  """xla_flags(num_devices) -> this session's XLA_FLAGS with that many CPU devices.

  For tests that start processes with another device count: they keep the
  session's other flags (the optimisation level above).
  """
  def make(num_devices):
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
  return make


@pytest.fixture(scope="session")
def tiny():
  """The TINY overrides, read-only."""
  return types.MappingProxyType(TINY)


@pytest.fixture(scope="session")
def tiny_config():
  """tiny_config(**{stage: num_steps}) -> the quick PolyMNIST config at TINY sizes."""
  def make(**stage_steps):
    config = polymnist_config.get_config("quick")
    for key, value in TINY.items():
      section, _, field = key.rpartition(".")
      (config[section] if section else config)[field] = value
    for stage, steps in stage_steps.items():
      config[stage].num_steps = steps
    return config
  return make


@pytest.fixture(scope="session")
def random_like():
  """random_like(tree, scale=0.1, seed=0): a tree of random normal leaves of tree's shapes.

  `tree` may hold arrays or ShapeDtypeStructs (jax.eval_shape of an init,
  which avoids compiling it); no weight is trivially zero, so tests of
  derivatives and shapes cannot pass by accident.
  """
  def make(tree, scale=0.1, seed=0):
    leaves, treedef = jax.tree.flatten(tree)
    rs = np.random.RandomState(seed)
    return jax.tree.unflatten(
        treedef, [jnp.asarray(scale * rs.randn(*l.shape), jnp.float32) for l in leaves])
  return make
