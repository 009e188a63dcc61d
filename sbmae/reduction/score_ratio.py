"""Score-ratio matching: the network s_theta ~ grad log(pi / rho) and its training.

For whitened samples x of pi and the reference rho = N(0, I_D), the score ratio
s = grad log(pi / rho) minimises the implicit objective
F(s) = E[1/2 ||s||^2 + div s - s.x] (DESIGN.md, "The maths"); F needs no
density. `train_score_ratio` fits s_theta = B_0 x + m(x) + r(x): a closed-form
linear term (`linear_fit`, exact for Gaussian latents, shrunk against sampling
noise), closed-form splines of each direction's marginal law (`marginal_fit`,
which finds private non-Gaussian units however weak) and a nonlinear residual
for the dependence between directions (ridge functions, or confined to the
directions of `structured_subspace`), trained by the project's one training loop
(`sbmae.training.run`, without checkpoints: the fit takes minutes) with early
stopping on held-out F.
`diagnostic_blocks` accumulates the diagonal blocks of H = E[s s^T];
`ica_directions` gives the marginal part's basis; `direction_z_scores` is
the cross-fitted test that separates structure from estimation noise.
`sbmae.reduction.reduction` builds the per-modality reduction on top of these;
the networks are in `sbmae.models.score_ratio`.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sbmae import errors
from sbmae import training
from sbmae.models.score_ratio import MLP
from sbmae.models.score_ratio import RidgeFunctions

Params = Any
PARAMETRISATIONS = ("subspace", "ridge", "lowrank", "linear_mlp", "mlp")


class ScoreRatioModel(NamedTuple):
  """Pure functions of a score-ratio parametrisation.

  init(rng, base, w0=None) -> params, base the fixed closed-form parts
  ({"linear": B_0 [D, D], "marginal": `marginal_fit`'s dict}, either optional;
  {} for "mlp"), stored in params under those keys and never trained, w0
  [D, j] starting directions for the first j columns of W ("ridge",
  "lowrank"; ignored else); score(params, x[B, D]) -> s[B, D];
  score_and_divergence(params, x[B, D], rng) -> (s[B, D], div s [B]);
  penalty(params) -> the sum of squares that the penalty coefficient scales;
  curvature(params, x[B, D], directions[K, D]) -> u^T J_s(x) u [B, K] (for
  `direction_z_scores`).
  """
  init: Callable[..., Params]
  score: Callable[[Params, jax.Array], jax.Array]
  score_and_divergence: Callable[..., tuple[jax.Array, jax.Array]]
  penalty: Callable[[Params], jax.Array]
  curvature: Callable[..., jax.Array]


def _weighted_trace(f, u, rng, weight, mode, num_probes):
  """tr(weight @ J_f(u)) for one vector u, exactly or by Hutchinson probes."""
  if mode == "exact":
    jac = jax.jacfwd(f)(u)
    return jnp.trace(jac) if weight is None else jnp.sum(jac.T * weight)
  if mode != "hutchinson":
    raise ValueError(f"Unknown divergence mode {mode!r}")
  probes = jax.random.rademacher(rng, (num_probes, u.shape[-1]), u.dtype)
  _, f_jvp = jax.linearize(f, u)
  left = probes if weight is None else probes @ weight
  return jnp.mean(jnp.sum(left * jax.vmap(f_jvp)(probes), axis=-1))


def linear_fit(x_train, x_held_out, grid):
  """Closed-form linear score ratio s(x) = B_0 x, guarded against noise.

  The minimiser of F over linear maps is I - Sigma^{-1}, i.e. diag(1 - 1/sigma)
  in the eigenbasis V of the training second moment. With gamma = D / n,
  sampling noise alone spreads sigma over the Marchenko-Pastur bulk
  [(1 - sqrt(gamma))^2, (1 + sqrt(gamma))^2], so three shrinkers are tried:
  soft thresholding, b = sign(sigma - 1) max(|sigma - 1| - lam, 0) / sigma (the
  minimiser of F + lam ||B||_*); hard thresholding, b = (1 - 1/sigma)
  [|sigma - 1| > lam]; and the spiked-covariance rule, b = 1 - 1/s_eff outside
  the bulk (0 inside), where ell solves sigma = ell (1 + gamma / (ell - 1)) and
  s_eff = 1 + c^2 (ell - 1) is the population variance along the sample
  eigenvector (c^2 its squared cosine with the spike). F is quadratic in b, so
  every candidate's held-out F is exact and cheap; the best is kept.

  Args:
    x_train: [n, D] whitened training samples.
    x_held_out: [m, D] whitened held-out samples.
    grid: thresholds lam to try, in units of sqrt(gamma).

  Returns:
    (B_0 [D, D], name of the chosen rule, its held-out F).
  """
  n, dim = x_train.shape
  gamma = dim / n
  sigma, v = jnp.linalg.eigh(x_train.T @ x_train / n)
  sigma = jnp.maximum(sigma, 1e-6)  # a constant direction would give 1/0
  # Held-out second moment along v: F(B) = sum_i b_i^2 s_i / 2 + b_i - b_i s_i.
  s_held = jnp.mean((x_held_out @ v) ** 2, axis=0)
  lams = jnp.asarray(grid, jnp.float32)[:, None] * math.sqrt(gamma)
  gap = jnp.abs(sigma - 1)
  soft = jnp.sign(sigma - 1) * jnp.maximum(gap - lams, 0) / sigma
  hard = jnp.where(gap > lams, 1 - 1 / sigma, 0.0)
  q = 1 + sigma - gamma
  root = jnp.sqrt(jnp.maximum(q**2 - 4 * sigma, 0))
  ell = jnp.where(sigma > 1, q + root, q - root) / 2
  cos2 = jnp.clip((1 - gamma / (ell - 1)**2) / (1 + gamma / (ell - 1)), 0, 1)
  outside = ((sigma > (1 + math.sqrt(gamma))**2)
             | (sigma < (1 - math.sqrt(gamma))**2))
  spiked = jnp.where(outside, 1 - 1 / (1 + cos2 * (ell - 1)), 0.0)
  b = jnp.concatenate([soft, hard, spiked[None]])
  f_held = jnp.sum(0.5 * b**2 * s_held + b - b * s_held, axis=-1)
  best = int(jnp.argmin(f_held))
  names = [f"{rule} threshold {lam} sqrt(D/n)" for rule in ("soft", "hard")
           for lam in grid] + ["spiked-covariance shrinkage"]
  return (v * b[best]) @ v.T, names[best], float(f_held[best])


def polar_factor(w, max_iterations=100, tolerance=1e-6):
  """(w w^T)^(-1/2) w, the nearest orthogonal matrix to a square w.

  Newton-Schulz iteration w <- 3/2 w - 1/2 w w^T w from w / ||w||_F (every
  singular value in (0, 1], where it converges to 1): matrix products only.
  XLA:CPU's SVD of a 64 x 64 matrix costs ~25 ms, 5x a whole FastICA
  iteration on 16,384 samples without it; this costs well under 1 ms and
  equals u v^T of the SVD to ~1e-6.
  """
  def not_done(state):
    i, _, change = state
    return (i < max_iterations) & (change > tolerance)

  def step(state):
    i, w, _ = state
    new = 1.5 * w - 0.5 * (w @ w.T) @ w
    return i + 1, new, jnp.max(jnp.abs(new - w))

  return jax.lax.while_loop(not_done, step, (0, w / jnp.linalg.norm(w), jnp.inf))[1]


@functools.partial(jax.jit, static_argnames=("num", "max_iterations"))
def ica_directions(x, rng, *, num, max_iterations=2000, tolerance=1e-5):
  """The `num` most non-Gaussian directions of whitened x [n, d] (FastICA).

  Why: a lone private direction (e.g. a sharply bimodal unit) is a needle for
  gradient descent on F: a random ridge direction overlaps it by ~1/sqrt(D),
  where the gradient is nearly flat, and early stopping ends the fit before it
  is found (measured: a bimodal unit with H eigenvalue 15.9 in 5 x 64 dims is
  missed with any patience; found when W starts near it). Projection pursuit
  finds such directions directly: symmetric FastICA with g = tanh, then the
  components ranked by |E log cosh(w.x) - E log cosh(N(0, 1))|.

  Args:
    x: [n, d] whitened samples of one block.
    rng: key for the random orthogonal start.
    num: directions returned.
    max_iterations: fixed-point iterations at most; they stop earlier once
      no direction moves by more than `tolerance` (1 - |cos|). Symmetric
      FastICA converges slowly in many dimensions: a 128-dim block of 8,000
      samples needs ~1,000 iterations to find a sharply bimodal unit (100
      leave it at |cos| 0.25).
    tolerance: convergence threshold.

  Returns:
    [d, num] unit directions, most non-Gaussian first.
  """
  d = x.shape[1]

  def not_done(state):
    i, _, change = state
    return (i < max_iterations) & (change > tolerance)

  def step(state):
    i, w, _ = state  # rows of w are the directions
    g = jnp.tanh(x @ w.T)
    new = polar_factor(g.T @ x / x.shape[0] - jnp.mean(1 - g * g, 0)[:, None] * w)
    return i + 1, new, jnp.max(1 - jnp.abs(jnp.sum(new * w, -1)))

  _, w, _ = jax.lax.while_loop(
      not_done, step, (0, polar_factor(jax.random.normal(rng, (d, d))), jnp.inf))
  gauss_logcosh = 0.3745672075  # E log cosh(N(0, 1))
  contrast = jnp.abs(jnp.mean(jnp.log(jnp.cosh(x @ w.T)), 0) - gauss_logcosh)
  return w[jnp.argsort(-contrast)[:num]].T


def marginal_features(t, knots):
  """Spline features of every coordinate of t and their derivatives.

  Coordinate k gets J hat functions centred at knots[k, 1:-1] (each rising from
  the knot before it and falling to the knot after it; the first stays 1 below
  its centre and the last above it, so the hats sum to 1 everywhere) and two
  linear tails, min(t - knots[k, 1], 0) and max(t - knots[k, -2], 0): beyond
  the outer centres a fitted function continues as a straight line from its
  value there, with a slope of its own (heavy tails). Without the clamp every
  function was forced through 0 at the outermost knots, and a law whose score
  ratio is far from 0 there (Student-t: g(t) ~ t) lost the ~30% of its H
  eigenvalue that lies beyond them.

  Args:
    t: [B, K] coordinates.
    knots: [K, J + 2] increasing knots per coordinate.

  Returns:
    (phi, dphi), each [B, K, J + 2]: the features and their derivatives in t.
  """
  a, m, b = knots[:, :-2], knots[:, 1:-1], knots[:, 2:]
  first = jnp.arange(m.shape[-1]) == 0
  last = jnp.arange(m.shape[-1]) == m.shape[-1] - 1
  u = t[..., None]
  rise = jnp.where(first, 1.0, (u - a) / (m - a))
  fall = jnp.where(last, 1.0, (b - u) / (b - m))
  hats = jnp.maximum(0.0, jnp.minimum(rise, fall))
  dhats = (jnp.where(~first & (u > a) & (u < m), 1 / (m - a), 0.0)
           - jnp.where(~last & (u >= m) & (u < b), 1 / (b - m), 0.0))
  lo, hi = knots[:, 1], knots[:, -2]
  tails = jnp.stack([jnp.minimum(t - lo, 0), jnp.maximum(t - hi, 0)], -1)
  dtails = jnp.stack([(t < lo), (t > hi)], -1).astype(t.dtype)
  return (jnp.concatenate([hats, tails], -1),
          jnp.concatenate([dhats, dtails], -1))


def marginal_splines(marginal, t):
  """(g, g') [B, K]: every direction's spline and its derivative at t [B, K].

  `marginal` is what `marginal_fit` returns (knots and theta per direction;
  the knots uniform, as `marginal_fit` places them). Equal to theta times
  `marginal_features`, but found by locating each t between two knots: O(B K)
  work instead of O(B K J) (the refinement rounds of `marginal_fit` took 16 s
  of a 5 x 64-dim fit on 16,000 samples through the features).
  """
  knots, theta = marginal["knots"], marginal["theta"]
  j = theta.shape[-1] - 2
  first, last = knots[:, 1], knots[:, -2]
  step = jnp.maximum((last - first) / (j - 1), 1e-12)
  pos = (t - first) / step
  idx = jnp.clip(jnp.floor(pos), 0, j - 2).astype(jnp.int32)
  frac = jnp.clip(pos - idx, 0.0, 1.0)
  flat = theta[:, :j].reshape(-1)
  offset = jnp.arange(theta.shape[0]) * j
  v0, v1 = flat[offset + idx], flat[offset + idx + 1]
  below, above = t < first, t > last
  tail_lo, tail_hi = theta[:, j], theta[:, j + 1]
  g = (v0 + frac * (v1 - v0) + tail_lo * jnp.minimum(t - first, 0.0)
       + tail_hi * jnp.maximum(t - last, 0.0))
  dg = jnp.where(below, tail_lo, jnp.where(above, tail_hi, (v1 - v0) / step))
  return g, dg


def marginal_score(marginal, x):
  """(s, div s) of the marginal part sum_k w_k g_k(w_k.x) at x [B, D].

  `marginal` is what `marginal_fit` returns; W has orthonormal columns, so
  div s = sum_k g_k'(w_k.x).
  """
  g, dg = marginal_splines(marginal, x @ marginal["W"])
  return g @ marginal["W"].T, jnp.sum(dg, -1)


def _marginal_coordinates(x, w, b0):
  """(t, target): every direction's coordinate and its regression target."""
  t = x @ w
  return t, t - (x @ b0.T) @ w  # target: the linear part's share removed


@functools.partial(jax.jit, static_argnames="covariance")
def _marginal_moments(x, w, b0, knots, covariance=False):
  """Per-direction normal equations of the marginal fit: (G [K, J', J'], r [K, J']).

  r is the mean of one term per sample, rho_n = phi(t_n) target_n - phi'(t_n);
  with `covariance`, their covariance Sigma [K, J', J'] is returned too.
  """
  t, target = _marginal_coordinates(x, w, b0)
  phi, dphi = marginal_features(t, knots)
  n = x.shape[0]
  gram = jnp.einsum("nkj,nki->kji", phi, phi) / n
  r = jnp.einsum("nkj,nk->kj", phi, target) / n - jnp.mean(dphi, 0)
  if not covariance:
    return gram, r
  rho = phi * target[..., None] - dphi  # [n, K, J']
  return gram, r, jnp.einsum("nkj,nki->kji", rho, rho) / n - r[:, :, None] * r[:, None]


@jax.jit
def _marginal_gain_z(x, w, b0, knots, theta):
  """(z-score, mean) of each direction's held-out F gain over g = 0."""
  t, target = _marginal_coordinates(x, w, b0)
  g, dg = marginal_splines({"knots": knots, "theta": theta}, t)
  f = 0.5 * g * g + dg - g * target
  mean, var = jnp.mean(f, 0), jnp.var(f, 0)
  return mean / jnp.sqrt(jnp.maximum(var, 1e-12) / x.shape[0]), mean


def marginal_fit(x_train, x_held_out, b0, dims, rng, *, num_knots,
                 smoothing_grid, ica_samples=0, min_gain_z=2.0, tail_quantile=0.002,
                 refine_rounds=0, deflation_rounds=0, polish_rounds=0,
                 refine_tolerance=0.0, energy_smoothing=0.0):
  """Closed-form score ratio of each direction's marginal law, on top of B_0 x.

  Why: a private law (a bimodal or heavy-tailed unit of one modality) is a
  needle for gradient descent next to dominant shared structure, and a weak
  one never beats the noise of a stochastic fit. Its score ratio is a 1-d
  function of one direction: in each block's ICA basis (the full rotation of
  `ica_directions`, refined by `_refine_basis`) the model sum_k w_k g_k(w_k.x), g_k a spline
  (`marginal_features`, J uniform knots between the `tail_quantile` quantiles
  of w_k.x), makes F quadratic and separable in the directions, so every g_k is
  a J x J solve. A second-difference roughness penalty (weight chosen per
  direction from `smoothing_grid` by held-out F) keeps g_k off sampling
  noise; a direction whose held-out F gain is not `min_gain_z` standard errors
  below 0 gets g_k = 0 (most noise directions: their spurious eigenvalues
  would crowd the noise floor).

  Args:
    x_train: [n, D] whitened training samples.
    x_held_out: [m, D] whitened held-out samples.
    b0: [D, D] the linear fit (`linear_fit`), kept fixed.
    dims: block sizes d_m, summing to D.
    rng: key for the ICA starts.
    num_knots: J, hat functions per direction.
    smoothing_grid: roughness-penalty weights tried.
    ica_samples: the ICA basis is found on the first this many training
      samples (0: all). Its cost is linear in them (symmetric FastICA runs
      all its iterations when a block has many Gaussian directions, which
      never settle); the splines use every sample.
    min_gain_z: held-out gain (in standard errors) a direction must show.
    tail_quantile: the outer knots sit at this quantile and its complement.
    refine_rounds: rounds of `_refine_basis` (efficient ICA with the fitted
      splines as score estimates) after the first ICA and after each
      deflation, each followed by a new spline fit.
    deflation_rounds: rounds of `_deflate`: each block's directions without a
      spline are replaced by a new ICA of the orthogonal complement of those
      with one, then splines and refinement again; stops early when a round
      adds no spline. Symmetric FastICA of a block can miss a weak unit
      beside a stronger one (a bimodal unit, eigenvalue 0.46, 74 degrees off
      beside a Student-t 4 in `private` m2, seed 1) and finds it once the
      stronger one is projected out (17-19 degrees, then refined).
    polish_rounds: further refinement rounds at most on the final basis,
      stopping once no direction with a spline moves more than
      `refine_tolerance` degrees in a round. A weak unit converges slowly:
      `private` m2's bimodal unit at split key 12 was 20 degrees off after 2
      rounds and 7.3 after 4. (Converging the first pass instead changes the
      basis that deflation starts from, and at `private` seed 1 its ICA then
      missed the unit that it found before: symmetric FastICA of a 63-dim
      complement finds a unit this weak at some keys and not others.)
    energy_smoothing: factor on each kept direction's chosen roughness
      weight for the debiased energy of its spline (`_energy_correction`);
      0: no correction.

  Returns:
    (marginal, held-out F gain over B_0 x alone): marginal = dict(W [D, D]
    block-diagonal orthonormal, knots [D, J + 2], theta [D, J + 2],
    energy_correction [D]: what to add to E[g_k^2] for an unbiased estimate,
    `energy_correction_blocks`).
  """
  edges = np.cumsum((0,) + tuple(dims))
  dim = int(edges[-1])
  w = np.zeros((dim, dim), np.float32)
  x_ica = x_train[:ica_samples] if ica_samples else x_train
  for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
    w[a:b, a:b] = np.asarray(ica_directions(
        x_ica[:, a:b], jax.random.fold_in(rng, i), num=int(b - a)))
  w = jnp.asarray(w)
  fit = functools.partial(_spline_fit, x_train, x_held_out, b0, num_knots=num_knots,
                          smoothing_grid=smoothing_grid, min_gain_z=min_gain_z,
                          tail_quantile=tail_quantile)

  def refine(w, fitted, rounds, tolerance=0.0):
    knots, theta, gain, lam = fitted
    for _ in range(rounds):
      w_old, w = w, _refine_basis(x_ica, w, knots, theta, tuple(int(e) for e in edges))
      knots, theta, gain, lam = fit(w)
      move = _largest_move_degrees(w_old, w, theta)
      logging.info("reduction: ICA refinement, largest move of a direction %.2f deg", move)
      if move < tolerance:
        break
    return dict(W=w, knots=knots, theta=theta), gain, lam

  def fit_and_refine(w, rounds):
    return refine(w, fit(w), rounds)

  marginal, gain, lam = fit_and_refine(w, refine_rounds)
  for r in range(deflation_rounds):
    kept = int(jnp.sum(_has_spline(marginal["theta"])))
    deflated = fit_and_refine(_deflate(x_ica, marginal["W"], marginal["theta"], edges,
                                       jax.random.fold_in(rng, len(dims) + r)), refine_rounds)
    if int(jnp.sum(_has_spline(deflated[0]["theta"]))) <= kept:
      break
    marginal, gain, lam = deflated
  if polish_rounds:
    fitted = (marginal["knots"], marginal["theta"], gain, lam)
    marginal, gain, lam = refine(marginal["W"], fitted, polish_rounds, refine_tolerance)
  marginal["energy_correction"] = (
      _energy_correction(x_train, x_held_out, b0, marginal["W"], marginal["knots"],
                         marginal["theta"], lam * energy_smoothing)
      if energy_smoothing else jnp.zeros(dim))
  return marginal, gain


def _largest_move_degrees(w_old, w_new, theta):
  """Largest angle (degrees) between old and new column of the directions with a spline."""
  cos = jnp.abs(jnp.sum(w_old * w_new, 0))
  angle = jnp.degrees(jnp.arccos(jnp.clip(cos, 0.0, 1.0)))
  return float(jnp.max(jnp.where(_has_spline(theta), angle, 0.0), initial=0.0))


def _has_spline(theta):
  """[K] bool: which directions `_spline_fit` kept a spline for (theta rows not 0)."""
  return jnp.any(theta != 0, axis=1)


def _deflate(x, w, theta, edges, rng):
  """w with each block's spline-less directions replaced by an ICA of their span.

  The span of the directions without a spline is the orthogonal complement
  of those with one, so the block stays orthonormal.
  """
  w = np.array(w)
  kept = np.asarray(_has_spline(theta))
  for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
    free = np.flatnonzero(~kept[a:b]) + a
    if len(free) < 2:
      continue
    c = w[a:b, free]  # [d_m, f] orthonormal
    v = ica_directions(x[:, a:b] @ c, jax.random.fold_in(rng, i), num=len(free))
    w[a:b, free] = c @ np.asarray(v)
  return jnp.asarray(w)


def _roughness(num_knots):
  """[J', J'] second-difference roughness penalty of `marginal_features`' hats."""
  size = num_knots + 2
  diff = np.diff(np.eye(num_knots), 2, axis=0)
  rough = np.zeros((size, size), np.float32)
  rough[:num_knots, :num_knots] = diff.T @ diff
  rough[num_knots:, num_knots:] = 1e-3 * np.eye(2)  # keeps the solve proper
  return jnp.asarray(rough)


def _spline_fit(x_train, x_held_out, b0, w, *, num_knots, smoothing_grid, min_gain_z,
                tail_quantile):
  """(knots, theta, held-out F gain, chosen roughness weights [K]) in the basis w."""
  dim = w.shape[1]
  t = np.asarray(x_train @ w)
  lo, hi = np.quantile(t, [tail_quantile, 1 - tail_quantile], axis=0)
  knots = jnp.asarray(lo[:, None] + (hi - lo)[:, None] * np.linspace(
      0, 1, num_knots + 2)[None], jnp.float32)
  rough = _roughness(num_knots)
  grid = jnp.asarray(smoothing_grid, jnp.float32)
  gram, r = _marginal_moments(x_train, w, b0, knots)
  thetas = jnp.linalg.solve(gram + grid[:, None, None, None] * rough,
                            r[None, ..., None])[..., 0]  # [L, D, J']
  gram_h, r_h = _marginal_moments(x_held_out, w, b0, knots)
  f_held = (0.5 * jnp.einsum("ldj,dji,ldi->ld", thetas, gram_h, thetas)
            - jnp.einsum("ldj,dj->ld", thetas, r_h))
  chosen = jnp.argmin(f_held, 0)
  theta = thetas[chosen, jnp.arange(dim)]
  z, gain = _marginal_gain_z(x_held_out, w, b0, knots, theta)
  keep = z < -min_gain_z
  return (knots, jnp.where(keep[:, None], theta, 0.0),
          float(jnp.sum(jnp.where(keep, gain, 0.0))), grid[chosen])


@jax.jit
def _energy_correction(x_train, x_held_out, b0, w, knots, theta, lam):
  """[K]: debiased minus plug-in held-out energy E[g_k(w_k.x)^2] of each spline.

  Why: the eigenvalue of a private direction is the energy E[g_k^2] of its
  spline, and the roughness weight that minimises held-out F (best for g_k
  itself) shrinks that energy: a quadratic functional wants less smoothing
  than the function (`private` m2 at seed 2: its bimodal and Student-t_4
  units, H 0.46 and 0.37 on the samples, came out 0.31-0.35 and 0.21-0.34
  at three split keys; with the correction and a converged basis 0.46-0.52
  and 0.34-0.39). The spline is a linear
  smoother, theta = A r with A = (G + lam R)^{-1} and r the mean of n
  independent per-sample terms of covariance Sigma
  (`_marginal_moments`), so with a smaller weight `lam` the energy
  theta^T G_h theta (G_h on the held-out samples) has the known upward bias
  tr(G_h A Sigma A^T) / n, which is subtracted.

  Args:
    x_train: [n, D] the splines' training samples.
    x_held_out: [m, D] held-out samples (where the energy is estimated).
    b0, w, knots, theta: the linear part and `marginal_fit`'s basis, knots
      and splines; a direction without a spline (theta 0) gets 0.
    lam: [K] roughness weights of the debiased energy.

  Returns:
    [K] the debiased energy minus theta^T G_h theta.
  """
  gram, r, sigma = _marginal_moments(x_train, w, b0, knots, covariance=True)
  gram_h, _ = _marginal_moments(x_held_out, w, b0, knots)
  a = jnp.linalg.inv(gram + lam[:, None, None] * _roughness(theta.shape[1] - 2))
  theta_s = jnp.einsum("kji,ki->kj", a, r)
  variance = jnp.einsum("kji,kil,kml,kmj->k", gram_h, a, sigma, a) / x_train.shape[0]
  energy = jnp.einsum("kj,kji,ki->k", theta_s, gram_h, theta_s) - variance
  plug_in = jnp.einsum("kj,kji,ki->k", theta, gram_h, theta)
  return jnp.where(_has_spline(theta), energy - plug_in, 0.0)


@functools.partial(jax.jit, static_argnames=("edges", "steps"))
def _refine_basis(x, w, knots, theta, edges, steps=20):
  """The kept directions moved to the fixed point of FastICA with the fitted scores.

  With the nonlinearity -psi_k, psi_k the score of direction k's marginal
  law, FastICA's fixed point is the maximum-likelihood (efficient) ICA
  estimate; `ica_directions`'s tanh is not, and leaves a sharp law's
  direction a few degrees off, which blurs it (a unit of within-mode variance
  0.059 seen 6 degrees off has variance 0.070: its H eigenvalue drops from
  15.9 to ~13). The spline g_k estimates psi_k(t) + t, so the update is
  w_k <- E[g_k'(w_k.x)] w_k - E[x g_k(w_k.x)], within each block, followed by
  symmetric decorrelation of the block; directions without a spline stay.
  """
  spans = list(zip(edges[:-1], edges[1:]))

  def step(w, _):
    blocks = []
    for a, b in spans:  # per block: x_b w_b and x_b^T g_b, never the D x D products.
      x_b, w_b = x[:, a:b], w[a:b, a:b]
      g, dg = marginal_splines({"knots": knots[a:b], "theta": theta[a:b]}, x_b @ w_b)
      new = w_b * jnp.mean(dg, 0) - x_b.T @ g / x.shape[0]
      kept = _has_spline(theta[a:b])
      new = jnp.where(kept, new / jnp.maximum(jnp.linalg.norm(new, axis=0), 1e-12), w_b)
      blocks.append(polar_factor(new))
    return jax.scipy.linalg.block_diag(*blocks), None

  return jax.lax.scan(step, w, None, length=steps)[0]


def closed_form_parts(params, x):
  """(s [B, D], div s [B]) of the fixed closed-form parts present in params.

  params may hold "linear" (B_0, `linear_fit`) and "marginal" (`marginal_fit`);
  neither is trained (stop_gradient).
  """
  s, div = jnp.zeros_like(x), jnp.zeros(x.shape[:1], x.dtype)
  if "linear" in params:
    b0 = jax.lax.stop_gradient(params["linear"])
    s, div = s + x @ b0.T, div + jnp.trace(b0)
  if "marginal" in params:
    s_m, div_m = marginal_score(jax.lax.stop_gradient(params["marginal"]), x)
    s, div = s + s_m, div + div_m
  return s, div


def closed_form_score(params, x):
  """s [B, D] of the closed-form parts alone (a `score_fn` for `diagnostic_blocks`)."""
  return closed_form_parts(params, x)[0]


def closed_form_curvature(params, x, directions):
  """u^T J u [B, K] of the closed-form parts: J = B_0 + W diag(g'(W^T x)) W^T."""
  out = jnp.zeros((x.shape[0], directions.shape[0]), x.dtype)
  if "linear" in params:
    out = out + jnp.sum((directions @ params["linear"]) * directions, -1)
  if "marginal" in params:
    marginal = params["marginal"]
    _, dg = marginal_splines(marginal, x @ marginal["W"])
    out = out + dg @ (marginal["W"].T @ directions.T) ** 2
  return out


def jvp_curvature(score_fn, params, x, directions):
  """u^T J_s(x) u [B, K] for every direction u [K, D], by one jvp each."""
  f = lambda v: score_fn(params, v)
  jvps = jax.vmap(lambda u: jax.jvp(f, (x,), (jnp.broadcast_to(u, x.shape),))[1])(
      directions)  # [K, B, D]
  return jnp.einsum("kbd,kd->bk", jvps, directions)


def _control_variate_mean(total, total_sq, cross, h_mean, h_var, reference, n):
  """(mean, variance) per sample of a - beta (h - reference), beta = cov(a, h) / var(h)."""
  mean = total / n
  var = jnp.maximum(total_sq / n - mean * mean, 0.0)
  if reference is None:
    return mean, var
  cov = cross / n - mean * h_mean
  beta = cov / h_var
  return mean - beta * (h_mean - reference), jnp.maximum(var - beta * cov, 0.0)


@functools.partial(jax.jit, static_argnames=("score_fn", "batch_size", "curvature_fn"))
def direction_z_scores(score_fn, params, x, directions, batch_size, curvature_fn=None,
                       second_moments=None):
  """Cross-fitted test of each direction u: is E[(u.s)(u.s*)] > 0? And E[(u.s)^2].

  By Stein's identity (integration by parts against pi), for any fixed s and
  the true score ratio s*: E_pi[(u.s)(u.s*)] = E_pi[(u.s)(u.x) - u.J_s u].
  The right side needs no s*; on samples that did not fit s, its mean is an
  unbiased estimate, and it is 0 in a direction where s* has no component, so
  what s learned there is estimation noise. Returns mean / standard error.

  Heavy tails: where pi has a heavy-tailed direction (Student-t), s* grows
  like x there, so (u.s)(u.x) and (u.s)^2 grow like (u.x)^2, whose mean over
  a few thousand samples has (near) infinite variance: one far sample moved a
  t_3 direction's eigenvalue from 1.0 to 1.4 and its z-score from 26 to 2.7
  (`private` m0, seed 2). With `second_moments` (E[(u.x)^2] over all samples,
  1 for whitened latents) both means take the control variate h = (u.x)^2:
  mean(a) - beta (mean(h) - E[h]), beta the regression slope of a on h over
  these samples, which removes the (u.x)^2 tail from the estimate and from its
  standard error.

  Args:
    score_fn: score_fn(params, x[B, D]) -> s[B, D].
    params: its parameters.
    x: [n, D] samples not used to fit params.
    directions: [K, D] unit directions.
    batch_size: samples per step.
    curvature_fn: curvature_fn(params, x[B, D], directions) -> u^T J_s u
      [B, K] (`ScoreRatioModel.curvature`); None: `jvp_curvature`.
    second_moments: [K] known E[(u.x)^2] of each direction; None: no
      control variate.

  Returns:
    (z [K], mean [K], energy [K]): z-scores, the estimates of
    E[(u.s)(u.s*)], and the estimates of E[(u.s)^2] (= u^T H u for u an
    eigenvector of H).
  """
  xb, wb = _batched(x, batch_size)
  curvature_fn = curvature_fn or functools.partial(jvp_curvature, score_fn)

  def body(acc, inp):
    xi, wi = inp
    us, ux = score_fn(params, xi) @ directions.T, xi @ directions.T
    stat = (us * ux - curvature_fn(params, xi, directions)) * wi[:, None]
    energy, h = us * us * wi[:, None], ux * ux * wi[:, None]
    terms = (stat, stat * stat, stat * h, energy, energy * energy, energy * h, h, h * h)
    return tuple(a + t.sum(0) for a, t in zip(acc, terms)), None

  k = directions.shape[0]
  sums, _ = jax.lax.scan(body, tuple(jnp.zeros(k) for _ in range(8)), (xb, wb))
  n = jnp.sum(wb)
  h_mean = sums[6] / n
  h_var = jnp.maximum(sums[7] / n - h_mean * h_mean, 1e-12)
  mean, var = _control_variate_mean(*sums[0:3], h_mean, h_var, second_moments, n)
  energy, _ = _control_variate_mean(*sums[3:6], h_mean, h_var, second_moments, n)
  return mean / jnp.sqrt(jnp.maximum(var, 1e-12) / n), mean, energy


def block_second_moments(x, dims):
  """Per block m, E[x_m x_m^T] [d_m, d_m] over the rows of x [n, D] (I if whitened)."""
  edges = np.cumsum((0,) + tuple(dims))
  return [x[:, a:b].T @ x[:, a:b] / x.shape[0] for a, b in zip(edges[:-1], edges[1:])]


def energy_correction_blocks(params, dims):
  """Per block m, W_m diag(c_m) W_m^T [d_m, d_m]: the marginal splines' energy correction.

  c = params["marginal"]["energy_correction"] (`marginal_fit`), W its basis;
  added to H_mm it replaces each spline's plug-in energy E[g_k^2] by the
  debiased one. None without a marginal part.
  """
  if "marginal" not in params:
    return None
  w, c = params["marginal"]["W"], params["marginal"]["energy_correction"]
  edges = np.cumsum((0,) + tuple(dims))
  return [(w[a:b, a:b] * c[a:b]) @ w[a:b, a:b].T for a, b in zip(edges[:-1], edges[1:])]


def block_eigen_z_scores(score_fn, params, blocks, x, dims, batch_size,
                         curvature_fn=None, second_moments=None, corrections=None):
  """Eigen-decomposition of every H_mm and the Stein z-score of each eigenvector.

  Args:
    score_fn, params, batch_size, curvature_fn: as for `direction_z_scores`.
    blocks: the matrices H_mm [d_m, d_m] (`diagnostic_blocks` sums / count).
    x: [n, D] samples not used to fit params (the z-scores' samples).
    dims: block sizes d_m.
    second_moments: per block the [d_m, d_m] second moment of all samples
      (the identity for whitened latents): the eigenvalues and z-scores then
      take `direction_z_scores`'s control variate for heavy tails, and the
      eigenvalues are its estimates of u^T H_mm u on x. None: the eigenvalues
      of `blocks` and no control variate.
    corrections: per block a [d_m, d_m] matrix added to H_mm before the
      eigen-decomposition and, as u^T C_m u, to each eigenvalue estimate
      (`energy_correction_blocks`); None: none. The z-scores test the
      fitted s and do not change.

  Returns:
    Per block, (eigenvalues [d_m] descending and clipped at 0, eigenvectors
    [d_m, d_m] as columns in that order, the same as rows of R^D [d_m, D]
    (zero outside the block), z-scores [d_m]).
  """
  out = []
  edges = np.cumsum((0,) + tuple(dims))[:-1]
  for m, (h, a, d) in enumerate(zip(blocks, edges, dims)):
    c = jnp.zeros_like(h) if corrections is None else corrections[m]
    lam, vec = jnp.linalg.eigh(0.5 * (h + h.T) + c)
    directions = jnp.zeros((d, x.shape[1])).at[:, a:a + d].set(vec.T)
    moments = (None if second_moments is None else
               jnp.einsum("kd,de,ke->k", vec.T, second_moments[m], vec.T))
    z, _, energy = direction_z_scores(score_fn, params, x, directions, batch_size,
                                      curvature_fn, moments)
    if moments is not None:
      lam = energy + jnp.einsum("dk,de,ek->k", vec, c, vec)
    order = jnp.argsort(-lam)
    out.append((jnp.clip(lam[order], 0.0, None), vec[:, order], directions[order], z[order]))
  return out


def structured_subspace(base, x_train, x_held_out, dims, *, num, significance,
                        batch_size, max_rounds=3):
  """Where the closed-form parts see structure: [D, k] block-diagonal directions.

  Why: a residual with free directions (ridge functions A g(W^T x)) overfits
  score matching in hundreds of dimensions: a learned w_k can single out
  training samples, and the divergence term rewards spikes of g'_k there
  (measured on `mixed`, 6 x 64 dims, 16,000 samples: training F -11.7 ->
  -100, held-out F -10.4 -> +600 in 2,300 steps; the early stop keeps step 0,
  so a weak shared mixture keeps the closed-form parts' 20-30% of its
  eigenvalues). Structure in pi = f(U^T x) N(0, I) has a score ratio
  U grad log f(U^T x): it lies in span(U) and depends on U^T x only. The
  closed-form parts already find span(U) (the linear part the cross-block
  correlation, the splines each direction's marginal law) but not its
  strength; a residual confined to it cannot single out samples.

  Per block m: the eigenvectors of H_mm of the closed-form score (training
  samples) whose cross-fitted Stein z-score (`direction_z_scores` on held-out
  samples) is at least `significance`; the `num` largest z-scores over all
  blocks are kept. Then, for up to `max_rounds` rounds, the directions that
  depend on those found (`dependent_directions`) are added.

  Args:
    base: the closed-form parts ({"linear", "marginal"}).
    x_train: [n, D] whitened samples the parts were fitted on.
    x_held_out: [m, D] whitened samples they were not.
    dims: block sizes d_m.
    num: at most this many directions in all.
    significance: z-score a direction must reach.
    batch_size: samples per step of the accumulations.
    max_rounds: rounds of `dependent_directions`.

  Returns:
    U [D, k], k <= num, orthonormal columns, each inside one block.
  """
  sums, count = diagnostic_blocks(closed_form_score, base, x_train, dims, batch_size)
  tested = block_eigen_z_scores(
      closed_form_score, base, [h / count for h in sums], x_held_out, dims, batch_size,
      closed_form_curvature, block_second_moments(
          jnp.concatenate([x_train, x_held_out]), dims))
  cols = np.concatenate([np.asarray(directions) for _, _, directions, _ in tested])
  zs = np.concatenate([np.asarray(z) for _, _, _, z in tested])
  keep = [i for i in np.argsort(-zs)[:num] if zs[i] >= significance]
  u = jnp.asarray(cols[sorted(keep)].T, jnp.float32).reshape(x_train.shape[1], len(keep))
  for _ in range(max_rounds):
    new = dependent_directions(x_train, x_held_out, u, dims,
                               significance=significance)[:, :num - u.shape[1]]
    if new.shape[1] == 0:
      break
    u = jnp.concatenate([u, new], axis=1)
  return u


def _block_mask(u, dims):
  """[D, k] 0/1: 1 on the rows of the block that holds each column of u."""
  edges = np.cumsum((0,) + tuple(dims))
  block = np.searchsorted(edges, np.argmax(np.abs(np.asarray(u)), axis=0), side="right") - 1
  rows = np.arange(edges[-1])[:, None]
  return jnp.asarray((rows >= edges[block]) & (rows < edges[block + 1]), u.dtype)


def dependent_directions(x_train, x_held_out, u, dims, *, significance, num_knots=8):
  """Directions of each block, orthogonal to u, that depend on u^T x: [D, j].

  If pi = f(V^T x) N(0, I), a direction outside span(V) is N(0, 1) and
  independent of everything else, so a coordinate y = v.x (v orthogonal to
  u) that nonlinear functions of u^T x predict is structure that u misses:
  e.g. the second direction of a shared plane whose first direction the
  closed-form parts found (measured on 4 blocks of 16 dims with a weak shared
  mixture: they find 1 of 2 in two blocks). Per block: regress its
  coordinates orthogonal to u on spline features of u^T x
  (`marginal_features`, `num_knots` per coordinate) on the training samples,
  take the eigenvectors v of the predictions' second moment, and keep those
  whose held-out statistic (v.y)(v.y_hat), mean 0 under independence, has a
  z-score of at least `significance`.

  Args:
    x_train: [n, D] whitened training samples.
    x_held_out: [m, D] whitened held-out samples.
    u: [D, k] orthonormal directions found so far, each inside one block.
    dims: block sizes d_m.
    significance: z-score a direction must reach.
    num_knots: spline knots per coordinate of u^T x.

  Returns:
    [D, j] orthonormal directions, each inside one block, orthogonal to u.
  """
  dim, k = u.shape
  if k == 0:
    return jnp.zeros((dim, 0), jnp.float32)
  t = x_train @ u
  lo, hi = jnp.quantile(t, 0.002, axis=0), jnp.quantile(t, 0.998, axis=0)
  knots = lo[:, None] + (hi - lo)[:, None] * jnp.linspace(0, 1, num_knots + 2)[None]
  features = lambda x: marginal_features(x @ u, knots)[0].reshape(x.shape[0], -1)
  phi = features(x_train)
  mean = jnp.mean(phi, 0)
  phi, phi_held = phi - mean, features(x_held_out) - mean
  gram = phi.T @ phi / phi.shape[0]
  gram = gram + 1e-3 * jnp.trace(gram) / gram.shape[0] * jnp.eye(gram.shape[0])
  out = []
  for a, d in zip(np.cumsum((0,) + tuple(dims))[:-1], dims):
    u_m = u[a:a + d]  # the columns of other blocks are zero here
    lam, c = jnp.linalg.eigh(jnp.eye(d) - u_m @ u_m.T)
    c = c[:, lam > 0.5]  # orthonormal complement of span(u_m) in the block
    if c.shape[1] == 0:
      continue
    y, y_held = x_train[:, a:a + d] @ c, x_held_out[:, a:a + d] @ c
    coef = jnp.linalg.solve(gram, phi.T @ y / phi.shape[0])
    pred = phi @ coef
    _, v = jnp.linalg.eigh(pred.T @ pred)
    stat = (y_held @ v) * (phi_held @ coef @ v)
    z = jnp.mean(stat, 0) / jnp.sqrt(jnp.var(stat, 0) / stat.shape[0] + 1e-12)
    found = c @ v[:, np.asarray(z) >= significance]
    out.append(jnp.zeros((dim, found.shape[1])).at[a:a + d].set(found))
  return (jnp.concatenate(out, axis=1) if out else
          jnp.zeros((dim, 0), jnp.float32))


def get_model(dim: int, config) -> ScoreRatioModel:
  """The score-ratio model on R^dim chosen by `config.parametrisation`.

  "auto" is not a model: `train_score_ratio` resolves it to two.
  """
  mode, probes = config.divergence, config.num_probes
  kind = config.parametrisation
  if kind == "subspace":
    # U = params["subspace"] [D, k] starts at `structured_subspace`'s
    # orthonormal directions; h is an MLP on R^k whose last layer starts at
    # zero. With subspace_learning_rate > 0 each column of U moves inside its
    # own block (params["subspace_mask"], fixed), else U is fixed.
    net = lambda k: MLP(k, config.width, config.depth)

    # An empty U (no structure found) leaves the closed-form parts alone.
    def init(rng, base, w0=None):
      del w0
      k = base["subspace"].shape[1]
      return dict(base, net=net(k).init(rng, jnp.zeros((k,)))["params"] if k else {})

    def directions(params):
      u = params["subspace"] * params["subspace_mask"]
      return u if config.subspace_learning_rate else jax.lax.stop_gradient(u)

    def residual(params, x):
      u = directions(params)
      if not u.shape[1]:
        return jnp.zeros_like(x)
      return net(u.shape[1]).apply({"params": params["net"]}, x @ u) @ u.T

    def residual_divergence(params, x, rng):
      # div U h(U^T x) = tr(J_h U^T U) (tr J_h while U stays orthonormal):
      # exact, k <= bottleneck jvps.
      del rng
      u = directions(params)
      if not u.shape[1]:
        return jnp.zeros(x.shape[:1], x.dtype)
      h = lambda v: net(u.shape[1]).apply({"params": params["net"]}, v)
      gram = u.T @ u
      return jax.vmap(lambda v: _weighted_trace(h, v, None, gram, "exact", 0))(x @ u)

    def penalty(params):
      del params
      return jnp.zeros(())

  elif kind in ("ridge", "lowrank"):
    # More ridge functions than dimensions help (more random starting
    # directions); an MLP on R^k gains nothing from k > D.
    k = config.bottleneck if kind == "ridge" else min(config.bottleneck, dim)
    # A starts at zero, so g keeps a random last layer (else no gradient).
    net = (RidgeFunctions(k, config.width) if kind == "ridge" else
           MLP(k, config.width, config.depth, zero_output=False))

    def init(rng, base, w0=None):
      rw, rg = jax.random.split(rng)
      w = jax.random.normal(rw, (dim, k)) / math.sqrt(dim)
      if w0 is not None:
        w = w.at[:, :min(k, w0.shape[1])].set(w0[:, :k])
      return dict(base, A=jnp.zeros((dim, k)), W=w,
                  g=net.init(rg, jnp.zeros((k,)))["params"])

    def residual(params, x):
      return net.apply({"params": params["g"]}, x @ params["W"]) @ params["A"].T

    def residual_divergence(params, x, rng):
      # div A g(W^T x) = tr(W^T A J_g(u)) at u = W^T x.
      g = lambda u: net.apply({"params": params["g"]}, u)
      u = x @ params["W"]
      if kind == "ridge":  # J_g is diagonal: one jvp along ones gives it.
        _, dg = jax.jvp(g, (u,), (jnp.ones_like(u),))
        return dg @ jnp.sum(params["W"] * params["A"], 0)
      m = params["W"].T @ params["A"]
      return jax.vmap(lambda ui, r: _weighted_trace(g, ui, r, m, mode, probes))(
          u, jax.random.split(rng, x.shape[0]))

    def penalty(params):
      return jnp.sum(params["A"] ** 2) + jnp.sum(params["W"] ** 2)

  elif kind in ("linear_mlp", "mlp"):
    net = MLP(dim, config.width, config.depth)

    def init(rng, base, w0=None):
      del w0
      return dict(base, net=net.init(rng, jnp.zeros((dim,)))["params"])

    def residual(params, x):
      return net.apply({"params": params["net"]}, x)

    def residual_divergence(params, x, rng):
      g = lambda xi: net.apply({"params": params["net"]}, xi)
      return jax.vmap(lambda xi, r: _weighted_trace(g, xi, r, None, mode,
                                                    probes))(
          x, jax.random.split(rng, x.shape[0]))

    def penalty(params):
      del params
      return jnp.zeros(())

  else:
    raise ValueError(f"parametrisation must be one of {PARAMETRISATIONS}, "
                     f"got {kind!r}")

  def score(params, x):
    return residual(params, x) + closed_form_score(params, x)

  def curvature(params, x, directions):
    # u^T J u: closed form for the fixed parts, jvps through the residual alone.
    return (jvp_curvature(residual, params, x, directions)
            + closed_form_curvature(params, x, directions))

  def score_and_divergence(params, x, rng):
    s_base, div_base = closed_form_parts(params, x)
    return (residual(params, x) + s_base,
            residual_divergence(params, x, rng) + div_base)

  return ScoreRatioModel(init, score, score_and_divergence, penalty, curvature)


def get_objective_fn(model: ScoreRatioModel):
  """Per-sample implicit objective f(x) = 1/2 ||s||^2 + div s - s.x.

  Its mean is F(s), equal to 1/2 E||s - grad log(pi/rho)||^2 up to a constant.
  """
  def objective_fn(params, rng, x):
    s, div = model.score_and_divergence(params, x, rng)
    return 0.5 * jnp.sum(s * s, -1) + div - jnp.sum(s * x, -1)
  return objective_fn


def get_loss_fn(model: ScoreRatioModel, penalty: float):
  """Training loss: mean objective plus penalty/2 * model.penalty(params).

  Returns:
    loss_fn(params, rng, batch) -> (loss, metrics).
  """
  objective_fn = get_objective_fn(model)

  def loss_fn(params, rng, batch):
    objective = jnp.mean(objective_fn(params, rng, batch))
    reg = 0.5 * penalty * model.penalty(params)
    return objective + reg, {"objective": objective, "penalty": reg}
  return loss_fn


def _batched(x, batch_size):
  """Pads x [n, ...] to whole batches: ([nb, batch, ...], weights)."""
  n = x.shape[0]
  nb = -(-n // batch_size)
  xp = jnp.pad(x, [(0, nb * batch_size - n)] + [(0, 0)] * (x.ndim - 1))
  w = (jnp.arange(nb * batch_size) < n).astype(x.dtype)
  return xp.reshape(nb, batch_size, *x.shape[1:]), w.reshape(nb, batch_size)


@functools.partial(jax.jit, static_argnames=("objective_fn", "batch_size"))
def held_out_objective(objective_fn, params, x, rng, batch_size):
  """Mean of objective_fn over x in batches (same rng: same probes)."""
  xb, wb = _batched(x, batch_size)

  def body(total, inp):
    i, xi, wi = inp
    f = objective_fn(params, jax.random.fold_in(rng, i), xi)
    return total + jnp.sum(f * wi), None

  total, _ = jax.lax.scan(body, jnp.zeros(()),
                          (jnp.arange(xb.shape[0]), xb, wb))
  return total / x.shape[0]


@functools.partial(jax.jit, static_argnames=("score_fn", "dims", "batch_size"))
def diagnostic_blocks(score_fn, params, x, dims, batch_size):
  """Sums of s_m s_m^T over x for every block m, never forming the D x D matrix.

  Args:
    score_fn: score_fn(params, x[B, D]) -> s[B, D].
    params: its parameters.
    x: [n, D] whitened samples (concatenated blocks).
    dims: tuple of block sizes d_m, summing to D.
    batch_size: samples per step of the accumulation loop.

  Returns:
    (sums, count): a tuple of [d_m, d_m] sums and the number of samples; H_mm is
    sums[m] / count. Both can be psum-ed over devices before the division.
  """
  xb, wb = _batched(x, batch_size)
  edges = np.cumsum((0,) + tuple(dims))

  def body(sums, inp):
    xi, wi = inp
    s = score_fn(params, xi) * wi[:, None]
    blocks = [s[:, a:b] for a, b in zip(edges[:-1], edges[1:])]
    return tuple(acc + sb.T @ sb for acc, sb in zip(sums, blocks)), None

  init = tuple(jnp.zeros((d, d), x.dtype) for d in dims)
  sums, _ = jax.lax.scan(body, init, (xb, wb))
  return sums, jnp.sum(wb)


def closed_form_base(x_train, x_held_out, *, rng, config, dims):
  """The fixed closed-form parts of s_theta: {"linear": B_0, "marginal": ...}.

  Empty for "mlp"; the marginal splines only if `config.marginal_knots`.
  Computed once per fit and shared by every residual "auto" tries.

  Args:
    x_train: [n, D] whitened training samples.
    x_held_out: [m, D] whitened held-out samples (the linear threshold and
      the splines' smoothing are chosen on them).
    rng: key of the ICA starts.
    config: a `sbmae.reduction.ReductionConfig`.
    dims: block sizes d_m, summing to D.

  Returns:
    (base, info): info holds "linear_held_out_objective" (F of B_0 x alone)
    where there is a linear part and "marginal_held_out_gain" (the splines'
    held-out F gain over it) where there are splines.
  """
  base, info = {}, {}
  if config.parametrisation == "mlp":
    return base, info
  base["linear"], rule, info["linear_held_out_objective"] = linear_fit(
      x_train, x_held_out, config.threshold_grid)
  logging.info("reduction: linear fit (%s), held-out F %.4f", rule,
               info["linear_held_out_objective"])
  if config.marginal_knots:
    base["marginal"], info["marginal_held_out_gain"] = marginal_fit(
        x_train, x_held_out, base["linear"], dims, rng,
        num_knots=config.marginal_knots, smoothing_grid=config.smoothing_grid,
        ica_samples=config.ica_samples, refine_rounds=config.ica_refine_rounds,
        polish_rounds=config.ica_polish_rounds, refine_tolerance=config.ica_refine_tolerance,
        deflation_rounds=config.ica_deflation_rounds,
        energy_smoothing=config.energy_smoothing)
    logging.info("reduction: marginal splines, held-out F gain %.4f",
                 info["marginal_held_out_gain"])
  return base, info


def train_score_ratio(x_train, x_held_out, *, rng, config, dims=None):
  """Fits s_theta by score-ratio matching with early stopping on held-out F.

  "auto" fits the "ridge" and the "subspace" residual on the same closed-form
  parts, split, initialisation keys and held-out probes and keeps the one
  with the lower held-out F: neither wins everywhere (module docstring of
  `sbmae.reduction.reduction`, ReductionConfig.parametrisation).

  Args:
    x_train: [n, D] whitened training samples.
    x_held_out: [m, D] whitened held-out samples.
    rng: PRNG key.
    dims: block sizes d_m (summing to D); the marginal splines
      (`marginal_fit`, if `config.marginal_knots`) live in each block's ICA
      basis, and the first W columns of "ridge" and "lowrank" start at each
      block's `config.ica_directions` most non-Gaussian directions. None: one
      block.
    config: a `sbmae.reduction.ReductionConfig` (its score-ratio fields).

  Returns:
    (model, params, info): the ScoreRatioModel, the parameters with the best
    held-out F, and a dict with "held_out_objective" (that F),
    "linear_held_out_objective" (F of the linear fit alone, if any),
    "marginal_held_out_gain" (the marginal splines' gain over it, if any),
    "base_held_out_objective" (F of the closed-form parts, before training),
    "train_steps", "best_step" and "parametrisation" (the residual kept; for
    "auto" also "<name>_held_out_objective" of each residual tried).
  """
  dims = tuple(dims or (x_train.shape[1],))
  keys = jax.random.split(rng, 4)  # init, batches, held-out probes, ICA
  base, info = closed_form_base(x_train, x_held_out, rng=keys[3], config=config, dims=dims)
  kinds = (("ridge", "subspace") if config.parametrisation == "auto" else
           (config.parametrisation,))
  fits = {kind: _train_residual(base, x_train, x_held_out, keys=keys, dims=dims,
                                config=dataclasses.replace(config, parametrisation=kind))
          for kind in kinds}
  objectives = {k: f[2]["held_out_objective"] for k, f in fits.items()}
  kind = min(objectives, key=objectives.get)
  if len(kinds) > 1:
    info.update({f"{k}_held_out_objective": f for k, f in objectives.items()})
    logging.info("reduction: residual %r kept (held-out F %s)", kind,
                 {k: round(f, 4) for k, f in objectives.items()})
  model, params, fit_info = fits[kind]
  info.update(fit_info, parametrisation=kind)
  return model, params, info


def _train_residual(base, x_train, x_held_out, *, keys, config, dims):
  """Trains one residual (`config.parametrisation`) on top of `base`.

  keys: (init, batches, held-out probes, ICA), the same for every residual.
  """
  n, dim = x_train.shape
  model = get_model(dim, config)
  k_init, k_train, k_eval, k_ica = keys
  base, info, num_steps = dict(base), {}, config.max_steps
  if config.parametrisation == "subspace":
    if "subspace" not in base:  # a caller's starting U is kept
      base["subspace"] = structured_subspace(
          base, x_train, x_held_out, dims, num=config.bottleneck,
          significance=config.significance, batch_size=config.batch_size)
    base["subspace_mask"] = _block_mask(base["subspace"], dims)
    logging.info("reduction: residual on %d structured directions",
                 base["subspace"].shape[1])
    if base["subspace"].shape[1] == 0:
      num_steps = 0  # nothing beyond the closed-form parts to refine
  penalty = config.penalty * math.sqrt(dim / n)
  loss_fn = get_loss_fn(model, penalty)
  objective_fn = get_objective_fn(model)
  w0 = None
  if config.parametrisation in ("ridge", "lowrank") and config.ica_directions:
    edges = np.cumsum((0,) + dims)
    cols = []
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
      num = min(config.ica_directions, int(b - a))
      u = (base["marginal"]["W"][a:b, a:a + num] if "marginal" in base else
           ica_directions(x_train[:, a:b], jax.random.fold_in(k_ica, i), num=num))
      cols.append(jnp.zeros((dim, u.shape[1])).at[a:b].set(u))
    w0 = jnp.concatenate(cols, axis=1)
  # max(1, .): max_steps=0 (the linear fit alone) never steps, but optax
  # refuses a zero-length schedule.
  schedule = optax.cosine_decay_schedule(config.learning_rate, max(1, config.max_steps),
                                         alpha=0.01)
  # Weight decay on the nonlinear kernels only (A, W have their penalty); the
  # closed-form linear part stays fixed.
  frozen = ("linear", "marginal", "subspace_mask") + (
      () if config.subspace_learning_rate else ("subspace",))
  labels = lambda p: flax.traverse_util.path_aware_map(
      lambda path, _: ("frozen" if path[0] in frozen else
                       "directions" if path[0] == "subspace" else
                       "decay" if path[-1].startswith("kernel") else "plain"),
      p)
  tx = optax.multi_transform(
      {"frozen": optax.set_to_zero(),
       "directions": optax.adam(optax.cosine_decay_schedule(
           config.subspace_learning_rate, max(1, config.max_steps), alpha=0.01)),
       "decay": optax.adamw(schedule, weight_decay=config.weight_decay),
       "plain": optax.adam(schedule)}, labels)
  state = training.TrainState.create(model.init(k_init, base, w0), tx)
  # Batches drawn with replacement, a pure function of the step (resumable).
  x_host, seed = np.asarray(x_train), int(jax.random.randint(k_train, (), 0, 2**31 - 1))
  batch_fn = lambda step: x_host[np.random.default_rng((seed, step)).integers(
      0, n, config.batch_size)]
  held_out_f = lambda p: float(held_out_objective(
      objective_fn, p, x_held_out, k_eval, config.batch_size))
  # The parameters with the best held-out F (copies: the train step donates).
  best = {"f": held_out_f(state.params), "step": 0, "bad": 0,
          "params": jax.tree.map(jnp.copy, state.params)}
  info["base_held_out_objective"] = best["f"]

  def eval_fn(state):
    step, f = int(state.step), held_out_f(state.params)
    if not math.isfinite(f):
      raise errors.NonFiniteError(
          f"reduction: held-out objective is {f} at step {step}; lower "
          "reduction.learning_rate or check the latents")
    if f < best["f"]:
      best.update(f=f, step=step, bad=0, params=jax.tree.map(jnp.copy, state.params))
    else:
      best["bad"] += 1
    return {"held_out_F": f, "best_held_out_F": best["f"]}

  state = training.run(
      "reduce", state, training.make_train_step(loss_fn, tx), batch_fn,
      num_steps=num_steps, rng=k_train, manager=None,
      log_every=config.eval_every, eval_fn=eval_fn, eval_every=config.eval_every,
      stop_fn=lambda history: best["bad"] >= config.patience)
  best_f, best_step, best_params = best["f"], best["step"], best["params"]
  info.update(held_out_objective=best_f, train_steps=int(state.step),
              best_step=best_step)
  return model, best_params, info

