"""Tests of sbmae.latents: whitening, the flat layout, modality masks."""

import jax
import jax.numpy as jnp
import numpy as np

from sbmae import latents


def test_whitening_gives_identity_covariance_and_triangular_factor():
  rs = np.random.RandomState(5)
  m = rs.randn(4, 4) + np.eye(4)
  z = 3.0 + rs.randn(5000, 4) @ m.T
  mu, w, winv = latents.whitening(z, jitter=0.0)
  x = (z - mu) @ w.T.astype(np.float64)
  np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(np.cov(x, rowvar=False, bias=True), np.eye(4), atol=1e-4)
  np.testing.assert_allclose(np.tril(w.T), w.T)  # L = w.T is triangular
  np.testing.assert_allclose(w @ winv, np.eye(4), atol=1e-5)


def test_whiten_to_identity_and_invert():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(20000, 4)) @ rng.normal(size=(4, 4)) + 3.0
  stats = latents.Whitening.fit({"a": z})
  x = np.asarray(stats.whiten({"a": jnp.asarray(z, jnp.float32)})["a"])
  np.testing.assert_allclose(np.cov(x, rowvar=False), np.eye(4), atol=1e-3)
  np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-3)
  back = np.asarray(stats.unwhiten({"a": jnp.asarray(x)})["a"])
  np.testing.assert_allclose(back, z, atol=1e-3)


def test_singular_latents_name_the_modality():
  z = np.zeros((50, 3))
  z[:, 0] = np.arange(50)
  try:
    latents.Whitening.fit({"dead": z}, jitter=0.0)
  except ValueError as e:
    assert "'dead'" in str(e)
  else:
    raise AssertionError("a singular covariance was whitened")


def test_save_load(tmp_path):
  stats = latents.Whitening.fit({"a": np.random.default_rng(1).normal(size=(100, 3)),
                                 "b": np.random.default_rng(2).normal(size=(100, 2))})
  stats.save(tmp_path / "s.npz")
  back = latents.Whitening.load(tmp_path / "s.npz")
  jax.tree.map(np.testing.assert_array_equal, stats, back)


def test_flatten_unflatten_round_trip():
  parts = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.arange(4.0).reshape(2, 2)}
  flat = latents.flatten(parts, ["b", "a"])
  np.testing.assert_array_equal(flat[0], [0, 1, 0, 1, 2])
  back = latents.unflatten(flat, ["b", "a"], [2, 3])
  jax.tree.map(np.testing.assert_array_equal, back, parts)


def test_modality_mask_to_coords():
  coords = latents.modality_mask_to_coords(
      np.array([[True, False, True], [False, True, False]]), (3, 5, 2))
  expected = np.array([[1] * 3 + [0] * 5 + [1] * 2, [0] * 3 + [1] * 5 + [0] * 2],
                      bool)
  np.testing.assert_array_equal(coords, expected)
