"""Tests of sbmae.reduction.score_ratio: divergences, curvature, the objective, the residuals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sbmae.reduction import closed_form
from sbmae.reduction import reduction
from sbmae.reduction import score_ratio


def _base(kind, dim, rng):
  """Fixed parts of a model: {} for "mlp", else a random linear and marginal
  part (and, for "subspace", 3 directions for the residual, each inside one
  of two blocks and not orthonormal, as trained directions become)."""
  if kind == "mlp":
    return {}
  rs = np.random.RandomState(rng)
  lo = -1 - rs.rand(dim, 1)
  knots = lo + (2 + rs.rand(dim, 1)) * np.linspace(0, 1, 8)[None]  # uniform, as fitted
  base = {"linear": jnp.asarray(rs.randn(dim, dim) * 0.3, jnp.float32),
          "marginal": {"W": jnp.asarray(np.linalg.qr(rs.randn(dim, dim))[0], jnp.float32),
                       "knots": jnp.asarray(knots, jnp.float32),
                       "theta": jnp.asarray(rs.randn(dim, 8), jnp.float32)}}
  if kind == "subspace":
    mask = np.zeros((dim, 3), np.float32)
    mask[:3, 0], mask[3:, 1:] = 1, 1
    base["subspace"] = jnp.asarray(rs.randn(dim, 3) * mask * 0.7, jnp.float32)
    base["subspace_mask"] = jnp.asarray(mask)
  return base


@pytest.mark.parametrize("kind", score_ratio.PARAMETRISATIONS)
def test_divergence_and_curvature_are_those_of_the_jacobian(kind, random_like):
  dim = 7
  config = reduction.ReductionConfig(parametrisation=kind, divergence="exact",
                                     bottleneck=4, width=8, depth=1)
  model = score_ratio.get_model(dim, config)
  base = _base(kind, dim, 1)
  params = dict(random_like(model.init(jax.random.key(0), base), scale=0.5), **base)
  x = jax.random.normal(jax.random.key(2), (5, dim))
  directions = jnp.asarray(np.linalg.qr(np.random.RandomState(4).randn(dim, 3))[0].T,
                           jnp.float32)

  @jax.jit
  def check(params, x):
    s, div = model.score_and_divergence(params, x, jax.random.key(3))
    jac = jax.vmap(jax.jacfwd(lambda xi: model.score(params, xi[None])[0]))(x)
    quad = jnp.einsum("kd,bde,ke->bk", directions, jac, directions)
    return (s, model.score(params, x), div, jnp.trace(jac, axis1=1, axis2=2),
            model.curvature(params, x, directions), quad)

  s, s_direct, div, trace, curvature, quad = check(params, x)
  np.testing.assert_allclose(s, s_direct, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(div, trace, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(curvature, quad, rtol=1e-4, atol=1e-4)


def test_empty_subspace_leaves_the_closed_form_parts():
  # No direction passed the test (e.g. pure N(0, I) latents): the model is
  # B_0 x + m(x), and it still trains (no parameters) and evaluates.
  dim = 7
  model = score_ratio.get_model(dim, reduction.ReductionConfig(parametrisation="subspace"))
  base = dict(_base("subspace", dim, 1), subspace=jnp.zeros((dim, 0)),
              subspace_mask=jnp.zeros((dim, 0)))
  params = model.init(jax.random.key(0), base)
  x = jax.random.normal(jax.random.key(2), (5, dim))
  s, div = model.score_and_divergence(params, x, jax.random.key(3))
  s_base, div_base = closed_form.closed_form_parts(base, x)
  np.testing.assert_allclose(s, s_base, rtol=1e-6)
  np.testing.assert_allclose(div, div_base, rtol=1e-6)


def test_hutchinson_divergence_averages_to_the_trace(random_like):
  dim = 7
  config = reduction.ReductionConfig(parametrisation="lowrank", bottleneck=4,
                                     width=8, depth=1, num_probes=4000)
  model = score_ratio.get_model(dim, config)
  exact = score_ratio.get_model(dim, dataclasses.replace(config,
                                                       divergence="exact"))
  params = random_like(model.init(jax.random.key(0), {"linear": jnp.eye(dim)}), scale=0.5)
  x = jax.random.normal(jax.random.key(2), (5, dim))
  _, div_h = jax.jit(model.score_and_divergence)(params, x, jax.random.key(4))
  _, div = jax.jit(exact.score_and_divergence)(params, x, jax.random.key(4))
  assert not np.allclose(div_h, div, rtol=1e-6, atol=0)  # really estimated
  np.testing.assert_allclose(div_h, div, rtol=0.05, atol=0.05 * float(
      jnp.abs(div).max()))


def test_objective_of_linear_score_has_closed_form():
  # F(B) = 1/2 tr(B S B^T) + tr(B) - tr(B S), S the second moment.
  dim = 6
  model = score_ratio.get_model(dim, reduction.ReductionConfig(parametrisation="ridge"))
  rs = np.random.RandomState(7)
  b = jnp.asarray(rs.randn(dim, dim), jnp.float32)
  x = jnp.asarray(rs.randn(500, dim) @ rs.randn(dim, dim), jnp.float32)
  params = model.init(jax.random.key(0), {"linear": b})  # residual starts at zero
  f = jax.jit(score_ratio.get_objective_fn(model))(params, jax.random.key(1), x)
  s2 = np.asarray(x, np.float64).T @ np.asarray(x, np.float64) / len(x)
  bb = np.asarray(b, np.float64)
  expected = 0.5 * np.trace(bb @ s2 @ bb.T) + np.trace(bb) - np.trace(bb @ s2)
  np.testing.assert_allclose(float(jnp.mean(f)), expected, rtol=1e-4)


def test_block_mask_marks_the_block_of_each_column():
  u = np.zeros((9, 3), np.float32)
  u[1, 0], u[4, 1], u[8, 2] = 1.0, -1.0, 0.5
  u[5, 1] = 0.1
  mask = np.asarray(score_ratio._block_mask(jnp.asarray(u), (3, 4, 2)))
  np.testing.assert_array_equal(mask[:, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(mask[:, 1], [0, 0, 0, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(mask[:, 2], [0, 0, 0, 0, 0, 0, 0, 1, 1])


def test_trained_subspace_directions_move_to_the_structure_and_stay_in_their_blocks():
  # Block a holds y1 ~ N(0, 1), block b the bimodal tanh(y1 / 0.2) + noise (so
  # its score ratio depends on y1 nonlinearly; a smooth step: with sign(y1)
  # the density jumps at y1 = 0, the Fisher information is infinite and a
  # deeper h keeps lowering F by sharpening the jump). U starts 25 degrees off
  # the true directions in both blocks: with a learning rate for U the
  # residual moves them within 5 degrees (0.2 and 1.1 measured) and never out
  # of their blocks; with none U stays.
  rs = np.random.RandomState(0)
  n, d = 12000, 4
  y = rs.randn(n, 2 * d)
  y[:, d] = 0.95 * np.tanh(y[:, 0] / 0.2) + np.sqrt(1 - 0.95 ** 2) * y[:, d]
  y[:, d] = (y[:, d] - y[:, d].mean()) / y[:, d].std()
  x = jnp.asarray(y, jnp.float32)
  off = np.radians(25)
  u = np.zeros((2 * d, 2), np.float32)
  u[[0, 1], 0] = np.cos(off), np.sin(off)
  u[[d, d + 1], 1] = np.cos(off), np.sin(off)
  base = {"linear": jnp.zeros((2 * d, 2 * d)), "subspace": jnp.asarray(u),
          "subspace_mask": score_ratio._block_mask(jnp.asarray(u), (d, d))}

  out = {}
  for lr in (0.0, 3e-3):
    config = reduction.ReductionConfig(parametrisation="subspace", subspace_learning_rate=lr,
                                       max_steps=1500, patience=100, eval_every=100,
                                       learning_rate=3e-3)
    keys = jax.random.split(jax.random.key(1), 4)
    _, params, _ = score_ratio._train_residual(base, x[:10000], x[10000:], keys=keys,
                                               config=config, dims=(d, d))
    out[lr] = np.asarray(params["subspace"] * params["subspace_mask"])
  np.testing.assert_allclose(out[0.0], u)
  moved = out[3e-3]
  assert np.all(moved[d:, 0] == 0) and np.all(moved[:d, 1] == 0)
  angles = [np.degrees(np.arccos(abs(moved[a, j]) / np.linalg.norm(moved[:, j])))
            for j, a in ((0, 0), (1, d))]
  assert max(angles) < 5, angles
