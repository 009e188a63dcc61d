"""Diagnostics of a fitted score ratio: H's blocks and where it has structure.

`diagnostic_blocks` accumulates the diagonal blocks H_mm of H = E[s s^T];
`direction_z_scores` is the cross-fitted Stein test that separates structure
from estimation noise, `block_eigen_z_scores` applies it to every eigenvector
of every H_mm; `structured_subspace` and `dependent_directions` find the
directions a confined residual may use (`sbmae.reduction.score_ratio`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sbmae.reduction.closed_form import closed_form_curvature
from sbmae.reduction.closed_form import closed_form_score
from sbmae.reduction.closed_form import marginal_features


def batched(x, batch_size):
  """Pads x [n, ...] to whole batches: ([nb, batch, ...], weights [nb, batch]).

  The weights are 1 on the rows of x and 0 on the padding.
  """
  n = x.shape[0]
  nb = -(-n // batch_size)
  xp = jnp.pad(x, [(0, nb * batch_size - n)] + [(0, 0)] * (x.ndim - 1))
  w = (jnp.arange(nb * batch_size) < n).astype(x.dtype)
  return xp.reshape(nb, batch_size, *x.shape[1:]), w.reshape(nb, batch_size)


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
  xb, wb = batched(x, batch_size)
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
  xb, wb = batched(x, batch_size)
  edges = np.cumsum((0,) + tuple(dims))

  def body(sums, inp):
    xi, wi = inp
    s = score_fn(params, xi) * wi[:, None]
    blocks = [s[:, a:b] for a, b in zip(edges[:-1], edges[1:])]
    return tuple(acc + sb.T @ sb for acc, sb in zip(sums, blocks)), None

  init = tuple(jnp.zeros((d, d), x.dtype) for d in dims)
  sums, _ = jax.lax.scan(body, init, (xb, wb))
  return sums, jnp.sum(wb)
