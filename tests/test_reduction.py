"""Tests of sbmae.reduction.reduction against closed forms.

Gaussian latents have a linear score ratio, so the diagnostic matrix is known:
for whitened x ~ N(0, Sigma), s(x) = (I - Sigma^{-1}) x and
H = Sigma - 2 I + Sigma^{-1}. A bimodal direction's eigenvalue is a 1-D
integral.
"""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sbmae import latents as latents_lib
from sbmae import testing
from sbmae.reduction import plots
from sbmae.reduction import reduction


D = 6  # size of each test block
RHOS = (0.8, 0.6)  # canonical correlations between blocks "a" and "b"
N = 10000


def _angle(u, v):
  """Largest principal angle between the column spans of u and v."""
  u = np.linalg.qr(np.asarray(u, np.float64))[0]
  v = np.linalg.qr(np.asarray(v, np.float64))[0]
  cos = np.linalg.svd(u.T @ v, compute_uv=False)
  return float(np.arccos(np.clip(cos.min(), -1.0, 1.0)))


def _mixing(rs, d):
  """A random invertible map and offset, so the raw latents need whitening."""
  return rs.randn(d, d) + 2 * np.eye(d), rs.randn(d)


def _coupled_gaussian(seed):
  """Blocks a, b ~ N(0, I) coupled by C = u diag(RHOS) v^T; c independent.

  Returns:
    (latents, mixing matrices of a and b, analytic H_aa and H_bb in the
    coordinates before mixing).
  """
  rs = np.random.RandomState(seed)
  u = np.linalg.qr(rs.randn(D, len(RHOS)))[0]
  v = np.linalg.qr(rs.randn(D, len(RHOS)))[0]
  c = (u * RHOS) @ v.T
  sigma = np.block([[np.eye(D), c], [c.T, np.eye(D)]])
  h = testing.gaussian_h(sigma)
  x = rs.multivariate_normal(np.zeros(2 * D), sigma, size=N)
  (ma, mua), (mb, mub) = _mixing(rs, D), _mixing(rs, D)
  latents = {"a": mua + x[:, :D] @ ma.T, "b": mub + x[:, D:] @ mb.T,
             "c": 3.0 * rs.randn(N, D) + 1.0}
  return latents, (ma, mb), (h[:D, :D], h[D:, D:])


def _whitened(latents):
  """(Whitening, whitened latents as numpy) of raw latents."""
  white = latents_lib.Whitening.fit(latents)
  return white, {n: np.asarray(v) for n, v in white.whiten(latents).items()}


@pytest.fixture(scope="module")
def gaussian_fit():
  latents, mixing, h_true = _coupled_gaussian(0)
  white, x = _whitened(latents)
  red = reduction.fit(x, epsilon=0.1, rng=jax.random.key(0),
                      config=reduction.ReductionConfig(min_rank=0))
  return white, mixing, h_true, red


def test_coupled_blocks_match_analytic_h(gaussian_fit):
  white, mixing, h_true, red = gaussian_fit
  for name, m, h in zip("ab", mixing, h_true):
    lam_true, vec_true = np.linalg.eigh(h)
    lam_true, vec_true = lam_true[::-1], vec_true[:, ::-1]
    lam = np.asarray(red.eigenvalues[name])
    r = len(RHOS)
    np.testing.assert_allclose(lam[:r], lam_true[:r], rtol=0.15)
    assert np.all(lam[r:] < 0.03)
    # x_white = Q x with Q = L^T M (orthogonal up to sampling error).
    q = np.asarray(white.whitener[name], np.float64) @ m
    assert _angle(q @ vec_true[:, :r], red.eigenvectors[name][:, :r]) < 0.15
    assert red.ranks[name] == r


def test_independent_block_gets_rank_zero(gaussian_fit):
  _, _, _, red = gaussian_fit
  assert red.ranks["c"] == 0
  assert 0.5 * float(jnp.sum(red.eigenvalues["c"])) < 0.02
  assert red.estimated_kl_bound < red.epsilon


def test_fit_refuses_latents_that_are_not_whitened():
  latents, _, _ = _coupled_gaussian(0)
  with pytest.raises(ValueError, match="modality 'a' are not whitened"):
    reduction.fit(latents, epsilon=0.1, rng=jax.random.key(0))


def test_bimodal_subspace_and_rank():
  # 20,000 samples (the scale of issue #15's benchmark): at 10,000 the splines
  # of the marginal part smooth the steep step between the modes (measured
  # eigenvalues 3.1 and 2.3 for 2.94; 2.73 and 2.67 at 20,000).
  n = 20000
  rs = np.random.RandomState(1)
  a = 0.9
  rot = np.linalg.qr(rs.randn(D, D))[0]
  y = rs.randn(n, D)
  y[:, :2] = (rs.choice([-a, a], size=(n, 2))
              + np.sqrt(1 - a * a) * rs.randn(n, 2))
  m, mu = _mixing(rs, D)
  white, x = _whitened({"b": mu + (y @ rot.T) @ m.T, "g": rs.randn(n, 4)})
  red = reduction.fit(x, epsilon=0.3, rng=jax.random.key(1),
                      config=reduction.ReductionConfig(min_rank=0))
  assert red.ranks == {"b": 2, "g": 0}
  q = np.asarray(white.whitener["b"], np.float64) @ m
  assert _angle(q @ rot[:, :2], red.bases["b"]) < 0.15
  # Eigenvalue of each bimodal direction: about 2.94 for a = 0.9.
  np.testing.assert_allclose(red.eigenvalues["b"][:2], testing.bimodal_eigenvalue(a),
                             rtol=0.25)


def _manual_reduction(seed=0, dims=(5, 3), ranks=(2, 0)):
  """A Reduction with random bases, no fitting involved."""
  rs = np.random.RandomState(seed)
  names = tuple(f"m{i}" for i in range(len(dims)))
  fields = {k: {} for k in ("eigenvalues", "eigenvectors")}
  for name, d in zip(names, dims):
    fields["eigenvalues"][name] = jnp.asarray(np.sort(rs.rand(d))[::-1],
                                              jnp.float32)
    fields["eigenvectors"][name] = jnp.asarray(
        np.linalg.qr(rs.randn(d, d))[0], jnp.float32)
  return reduction.Reduction(**fields, names=names, rank_tuple=ranks,
                             estimated_kl_bound=0.25, epsilon=0.5)


def test_project_lift_round_trip_is_orthogonal_projection():
  red = _manual_reduction()
  rs = np.random.RandomState(2)
  z = {n: jnp.asarray(rs.randn(7, d) * 2 + 1, jnp.float32)
       for n, d in red.dims.items()}
  y = jax.jit(lambda r, z: r.project(z))(red, z)
  assert {n: v.shape[-1] for n, v in y.items()} == red.ranks
  back = jax.jit(lambda r, y: r.lift(y))(red, y)
  for n in red.names:
    x, u = np.asarray(z[n]), np.asarray(red.bases[n])
    np.testing.assert_allclose(y[n], x @ u, atol=1e-5)
    np.testing.assert_allclose(back[n], x @ u @ u.T, atol=1e-4)


def test_lift_samples_reference_on_the_complement():
  red = _manual_reduction(ranks=(2, 1))
  rs = np.random.RandomState(3)
  num = 20000
  y = {n: jnp.asarray(np.tile(rs.randn(1, r), (num, 1)), jnp.float32)
       for n, r in red.ranks.items()}
  x = jax.jit(lambda r, y, k: r.lift(y, rng=k))(red, y, jax.random.key(4))
  for n in red.names:
    np.testing.assert_allclose(x[n] @ red.bases[n], y[n], atol=1e-4)
    xi = np.asarray(x[n] @ red.complements[n], np.float64)
    np.testing.assert_allclose(xi.mean(0), 0, atol=0.03)
    np.testing.assert_allclose(np.cov(xi, rowvar=False).reshape(len(xi.T), -1),
                               np.eye(xi.shape[1]), atol=0.04)


def test_select_ranks_rule():
  blocks = ([4.0, 1.0, 0.1], [0.05, 2.0, 0.5])  # order within a block is free
  assert reduction.select_ranks(blocks, 0.2) == ((2, 2), pytest.approx(0.075))
  assert reduction.select_ranks(blocks, 0.05) == ((3, 2), pytest.approx(0.025))
  # Ceilings can leave the bound above epsilon; it is still reported honestly.
  assert reduction.select_ranks(blocks, 0.2, max_rank=1) == (
      (1, 1), pytest.approx(0.825))
  assert reduction.select_ranks(blocks, 10.0, min_rank=1) == (
      (1, 1), pytest.approx(0.825))
  assert reduction.select_ranks(blocks, 0.2, min_rank=3) == ((3, 3), 0.0)
  # Without floors/ceilings the rule gives the smallest total rank meeting the
  # bound: check against brute force.
  rs = np.random.RandomState(0)
  lams = [np.sort(rs.exponential(size=d))[::-1] for d in (4, 3, 5)]
  eps = 0.4
  ranks, bound = reduction.select_ranks(lams, eps)
  all_ranks = itertools.product(*(range(len(l) + 1) for l in lams))
  best = min(sum(r) for r in all_ranks
             if 0.5 * sum(l[k:].sum() for l, k in zip(lams, r)) < eps)
  assert sum(ranks) == best and bound < eps
  np.testing.assert_allclose(
      bound, 0.5 * sum(l[k:].sum() for l, k in zip(lams, ranks)))


def test_config_from_project_section():
  section = ml_collections.ConfigDict(
      dict(enabled=True, epsilon=0.5, min_rank=2, max_rank=-1,
           threshold_grid=[0.0, 1.0]))
  config = reduction.make_config(section)
  assert config.min_rank == 2 and config.threshold_grid == (0.0, 1.0)
  assert config.parametrisation == reduction.ReductionConfig().parametrisation
  with pytest.raises(ValueError, match="min_rnak"):
    reduction.make_config(dict(min_rnak=2))


def test_with_epsilon_rechooses_ranks_from_the_same_eigenvalues():
  red = _manual_reduction()
  eigs = [np.asarray(red.eigenvalues[n]) for n in red.names]
  for eps in (0.05, 0.3, 1.0):
    other = red.with_epsilon(eps)
    ranks, bound = reduction.select_ranks(eigs, eps)
    assert other.rank_tuple == ranks and other.estimated_kl_bound == pytest.approx(bound)
    assert bound < eps and other.epsilon == eps
    for n, r in zip(red.names, ranks):
      np.testing.assert_array_equal(other.bases[n], red.eigenvectors[n][:, :r])
  assert sum(red.with_epsilon(0.05).rank_tuple) > sum(red.with_epsilon(1.0).rank_tuple)


def test_save_restore_round_trip(tmp_path):
  red = _manual_reduction()
  red.save(tmp_path / "reduction")
  back = reduction.Reduction.restore(tmp_path / "reduction")
  assert back.names == red.names and back.ranks == red.ranks
  assert back.estimated_kl_bound == red.estimated_kl_bound and back.epsilon == red.epsilon
  for a, b in zip(jax.tree.leaves(red), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_plots_are_written(tmp_path):
  red = _manual_reduction()
  for path in plots.save_all(red, tmp_path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  curve = plots.bound_curve(red)
  total = sum(red.ranks.values())
  assert curve[0] == pytest.approx(0.5 * sum(float(jnp.sum(v)) for v in
                                             red.eigenvalues.values()))
  assert curve[-1] == 0.0 and np.all(np.diff(curve) <= 0)
  assert len(curve) == sum(red.dims.values()) + 1 and total <= len(curve)


def test_private_mode_beside_shared_structure_and_the_noise_floor():
  # Issue #15 in miniature: a shared 10-class mixture in every block, a lone
  # sharply bimodal unit in one, an empty block; the fit must find every
  # structured direction and keep no noise direction.
  structure = [[("shared", 0.1), ("bimodal", 0.97)], [("shared", 0.1)], []]
  raw, truth, _ = testing.synthetic_latents(structure, 6000, seed=0, dim=12)
  white, x = _whitened(raw)
  red = reduction.fit(x, epsilon=0.1, rng=jax.random.key(0),
                      config=reduction.ReductionConfig(min_rank=0))
  assert red.ranks == {"m0": 3, "m1": 2, "m2": 0}
  assert red.signal_dims == (3, 2, 0)
  for name in ("m0", "m1"):
    basis = np.asarray(white.whitener[name], np.float64) @ truth[name][0]
    assert _angle(basis, red.bases[name]) < np.radians(10)
  # The bimodal direction is the largest: its J - 1 = 15.9. At 6,000 samples
  # (1,200 held out for H) only the right size is asserted; the benchmark
  # checks 25% at 20,000.
  np.testing.assert_allclose(red.eigenvalues["m0"][0],
                             testing.bimodal_eigenvalue(0.97), rtol=0.4)


def test_weak_shared_mixture_is_found_in_full():
  # Issue #15's `mixed` failure in miniature: a 10-class mixture with
  # overlapping classes (within-class variance 0.4) shared by three 16-dim
  # blocks, a fourth block empty. The closed-form parts find only one of the
  # two shared directions in some blocks and a free ridge residual overfits
  # (measured: second eigenvalues 0.44-0.53 of 0.86-0.91); the fit must give
  # every block its 2-dim plane and both eigenvalues within 25% with the
  # "subspace" residual, which "auto" must choose by its lower held-out F.
  # 20,000 samples, the benchmark's scale: at 10,000 one plane comes out 17
  # deg off.
  structure = [[("shared", 0.4)]] * 3 + [[]]
  raw, truth, shared = testing.synthetic_latents(structure, 20000, seed=0, dim=16)
  lam_true = testing.shared_eigenvalues(raw, truth, shared)
  white, x = _whitened(raw)
  red = reduction.fit(x, epsilon=0.1, rng=jax.random.key(0), config=reduction.ReductionConfig(
      parametrisation="auto", min_rank=0))
  stats = red.stats
  assert stats["parametrisation"] == "subspace"
  assert stats["subspace_held_out_objective"] < stats["ridge_held_out_objective"]
  assert stats["held_out_objective"] == stats["subspace_held_out_objective"]
  assert red.ranks == {"m0": 2, "m1": 2, "m2": 2, "m3": 0}
  for name in ("m0", "m1", "m2"):
    basis = np.asarray(white.whitener[name], np.float64) @ truth[name][0]
    assert _angle(basis, red.bases[name]) < np.radians(10)
    np.testing.assert_allclose(red.eigenvalues[name][:2], lam_true[name], rtol=0.25)
