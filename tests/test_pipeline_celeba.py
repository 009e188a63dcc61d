"""CelebAMask-HQ through sbmae.pipeline: loader, configs, end-to-end runs.

The end-to-end tests run every stage on a 40-face fixture in the release's raw
layout (tests/celeba_fixture.py) at 32x32 with 2 steps per stage; the
autoencoders stage is trained once and shared.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import celeba_fixture
from configs import celeba as celeba_config
from sbmae import pipeline
from sbmae import rundir
from sbmae import system
from sbmae.data import celeba
from sbmae.data import modalities
from sbmae.eval import celeba as eval_celeba
from sbmae.eval import inception
from sbmae.data import input_pipeline
from sbmae.models import autoencoder
from sbmae.models import score


NUM_FACES, TEST_SPLIT = 40, 8
# Every conditioning subset and the metric of each modality it generates; the
# reference rows score all three.
EXPECTED = {
    "given_image": ("attrs_f1", "mask_f1"),
    "given_mask": ("attrs_f1", "fd_pixels"),
    "given_attrs": ("mask_f1", "fd_pixels"),
    "given_image+mask": ("attrs_f1",),
    "given_image+attrs": ("mask_f1",),
    "given_mask+attrs": ("fd_pixels",),
    "unconditional": ("attrs_f1", "mask_f1", "fd_pixels"),
    "reconstruction": ("attrs_f1", "mask_f1", "fd_pixels"),
}


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("celeba_raw")
  celeba_fixture.write_fixture(root, n=NUM_FACES, image_px=64, mask_px=32, folder_size=16)
  return root


def tiny_config(root, arg=""):
  config = celeba_config.get_config(",".join(["quick"] + ([arg] if arg else [])))
  config.data.update(path=str(root), image_size=32, test_split_size=TEST_SPLIT,
                     num_train=-1, num_test=-1)
  config.log_every, config.checkpoint_every = 1, 100
  # 32x32: the stem and three stride-2 stages reach 2x2. The attribute MLP's
  # last hidden width must reach latent_dim, or its latents have a singular
  # covariance that cannot be whitened.
  config.autoencoder.update(widths=(8, 8, 8), latent_dim=8, num_steps=2, batch_size=8,
                            warmup_steps=0)
  config.reduction.max_steps = 1  # (0, "the linear fit alone", trips optax's schedule)
  config.prior.update(hidden=16, num_layers=1, num_steps=2, batch_size=8, warmup_steps=0)
  config.sampling.update(num_steps=2, batch_size=8)
  config.eval.update(num_examples=8, num_unconditional=8, grid_examples=2)
  return config


@pytest.fixture(scope="module")
def autoencoders_dir(raw_root, tmp_path_factory):
  """A workdir whose data cache and autoencoders stage are done."""
  workdir = tmp_path_factory.mktemp("celeba_ae")
  config = tiny_config(raw_root)
  config.stage = "autoencoders"
  pipeline.train_and_evaluate(config, workdir)
  return workdir


def _fake_inception(path):
  """Stands in for InceptionV3 (no weights here): 48 block means of the image."""
  del path
  return lambda x: jnp.mean(x.reshape(len(x), 4, x.shape[1] // 4, 4, -1, 3), axis=(2, 4)
                            ).reshape(len(x), -1)


def _run_rest_and_check(config, autoencoders_dir, workdir):
  shutil.copytree(autoencoders_dir, workdir)
  pipeline.train_and_evaluate(config, workdir)
  result = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert result["num_examples"] == TEST_SPLIT
  for label, names in EXPECTED.items():
    if config.eval.inception_path and "fd_pixels" in names:
      names += ("fid",)
    assert sorted(result["per_subset"][label]) == sorted(names), label
    for name in names:
      value = result["metrics"][eval_celeba.metric_key(name, label)]
      assert value == result["per_subset"][label][name]
      assert np.isfinite(value) and (value >= 0.0)
      if name.endswith("_f1"):
        assert value <= 1.0
  assert set(result["per_subset"]) == set(EXPECTED)
  for label in EXPECTED:
    assert (workdir / "eval" / f"{label}.png").exists(), label
  assert (workdir / "data_examples.png").exists()
  return result


def test_pipeline_without_reduction(raw_root, autoencoders_dir, tmp_path, monkeypatch):
  config = tiny_config(raw_root)
  config.eval.inception_path = "/no/such/weights.npz"
  monkeypatch.setattr(inception, "get_feature_fn", _fake_inception)
  result = _run_rest_and_check(config, autoencoders_dir, tmp_path / "run")
  assert result["metrics"]["fid/image/given_mask"] != result["metrics"][
      "fd_pixels/image/given_mask"]
  # The saved run generates any modality from any other.
  mm = system.load(tmp_path / "run")
  out = mm.generate(jax.random.PRNGKey(0), {"mask": jnp.ones((2, 32, 32, 1))},
                    observed=["mask"])
  assert out["image"].shape == (2, 32, 32, 3) and out["attrs"].shape == (2, 18)
  assert np.all((np.asarray(out["attrs"]) >= 0) & (np.asarray(out["attrs"]) <= 1))


def test_pipeline_with_reduction(raw_root, autoencoders_dir, tmp_path):
  config = tiny_config(raw_root, "reduce")
  result = _run_rest_and_check(config, autoencoders_dir, tmp_path / "run")
  assert "fid/image/unconditional" not in result["metrics"]  # no Inception weights given
  ranks = json.loads((tmp_path / "run" / "reduce" / "reduction.json").read_text())["ranks"]
  assert len(ranks) == 3 and all(1 <= r <= 8 for r in ranks)


def test_loader_gives_binary_modalities_as_bool_and_no_index(raw_root, tmp_path):
  config = tiny_config(raw_root)
  config.data.num_test = 5
  data, mods = pipeline.load_data(config, rundir.RunDir(tmp_path))
  assert [m.name for m in mods] == list(celeba.MODALITIES)
  for split, n in (("train", NUM_FACES - TEST_SPLIT), ("test", 5)):
    arrays = data[split]
    assert set(arrays) == set(celeba.MODALITIES)
    for m in mods:
      dtype = np.uint8 if m.name == "image" else bool
      assert arrays[m.name].dtype == dtype and arrays[m.name].shape == (n,) + m.shape
  expected = celeba.read_split(raw_root, 32, num_test=TEST_SPLIT, num_workers=1,
                               progress=False)
  np.testing.assert_array_equal(data["test"]["attrs"], expected["test"]["attrs"][:5] == 1)
  np.testing.assert_array_equal(data["train"]["mask"], expected["train"]["mask"] == 1)
  batch = next(input_pipeline.batches(data["train"], 4, seed=0))
  assert set(np.unique(batch["mask"])) <= {0.0, 1.0} and set(np.unique(batch["attrs"])) <= {
      0.0, 1.0}
  assert batch["attrs"].max() == 1.0


def test_loader_without_path_or_cache_says_how_to_get_the_data(tmp_path):
  config = celeba_config.get_config("quick")
  with pytest.raises(celeba.CelebANotFoundError,
                     match="config.data.path is empty.*CelebAMask-HQ"):
    pipeline.load_data(config, rundir.RunDir(tmp_path))


@pytest.mark.parametrize("arg, size", [("", 128), ("quick", 64), ("reduce", 128),
                                       ("mlp", 128)])
def test_config_networks_fit_the_image_size(arg, size):
  config = celeba_config.get_config(arg)
  assert config.data.name == "celeba" and config.data.image_size == size
  assert config.reduction.enabled == ("reduce" in arg)
  c = config.autoencoder
  for m in modalities.celeba(size):
    model = autoencoder.AutoEncoder(kind=m.kind, shape=m.shape, latent_dim=c.latent_dim,
                                    widths=tuple(c.widths))
    x = jax.ShapeDtypeStruct((2,) + m.shape, jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert jax.eval_shape(model.apply, params, x).shape == x.shape
    if m.kind == "image":  # the encoder ends at 2x2 before its dense layer.
      dense = params["params"]["encoder"]["Dense_0"]["kernel"]
      assert dense.shape[0] == 2 * 2 * c.widths[-1]
  dims = (c.latent_dim,) * 3
  net = score.get_model(config.prior, dims)
  z = jax.ShapeDtypeStruct((2, sum(dims)), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  net_params = jax.eval_shape(net.init, jax.random.PRNGKey(0), z, t, z)
  assert jax.eval_shape(net.apply, net_params, z, t, z).shape == z.shape


def test_unknown_config_token_is_named():
  with pytest.raises(ValueError, match=r"unknown config argument\(s\) \['tiny'\]"):
    celeba_config.get_config("quick,tiny")
