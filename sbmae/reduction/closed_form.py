"""Closed-form parts of the score ratio: the linear fit and the marginal splines.

`linear_fit` gives B_0 (the minimiser of F over linear maps, shrunk against
sampling noise; exact for Gaussian latents); `marginal_fit` gives closed-form
splines of each direction's marginal law in each block's ICA basis
(`ica_directions`, refined to maximum-likelihood ICA), which find private
non-Gaussian units however weak. Neither is trained: `closed_form_base` fits
both from a `ReductionConfig`, `closed_form_parts` evaluates them, and
`sbmae.reduction.score_ratio` trains a residual on top of them.
"""

import functools
import math

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np


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
