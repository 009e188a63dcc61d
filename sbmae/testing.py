"""Analytic cases with known answers, shared by the tests and the benchmarks.

Closed forms the code is checked against: the diffused score of a Gaussian
(also for any conditioning task), its conditionals, the diagnostic matrix H of
a Gaussian, and the H eigenvalue of a symmetric two-component mixture; and the
moment check of samples against a Gaussian. For the reduction: synthetic latents
of known structure (`synthetic_latents`), the exact score of their law
(`exact_scores`) and the exact H eigenvalues of the whitened law on a sample
(`sample_eigenvalues`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from sbmae import latents


def random_gaussian(dim, eigenvalues, seed=0):
  """(mu [dim], sigma [dim, dim]): a Gaussian with the given covariance spectrum.

  The eigenvectors are a seeded random rotation and mu is spread over
  [-1, 2], so no coordinate is special.
  """
  q, _ = np.linalg.qr(np.random.RandomState(seed).randn(dim, dim))
  return np.linspace(-1.0, 2.0, dim), q @ np.diag(eigenvalues) @ q.T


def whitened_errors(x, mean, cov):
  """(max |whitened mean|, max |whitened covariance - I|) of samples x [N, d].

  Samples of N(mean, cov) give errors of order 1/sqrt(N) in these units.
  """
  w = np.linalg.solve(np.linalg.cholesky(cov), (x - mean).T).T
  d = len(mean)
  return (np.abs(w.mean(0)).max(),
          np.abs(np.cov(w.T).reshape(d, d) - np.eye(d)).max())


def gaussian_score_fn(sde, mu, sigma, sign=1.0):
  """The exact score of N(mu, sigma) diffused by `sde`, as a prior score_fn.

  Under the kernel x_t = alpha x_0 + std z the marginal is
  N(alpha mu, alpha^2 sigma + std^2 I), computed in sigma's eigenbasis.

  Args:
    sde: forward SDE with marginal_coeffs(t) -> (alpha, std).
    mu: [D] mean.
    sigma: [D, D] covariance.
    sign: -1 gives the wrong-signed score (tests must tell them apart).

  Returns:
    score_fn(params, x [B, D], t [B], clean_mask) -> [B, D] (params and the
    mask are ignored).
  """
  lam, q = np.linalg.eigh(sigma)
  lam, q, mu = (jnp.asarray(v, jnp.float32) for v in (lam, q, mu))

  def score_fn(params, x, t, clean_mask):
    del params, clean_mask
    a, s = sde.marginal_coeffs(t)
    r = (x - a[:, None] * mu) @ q
    return -sign * (r / (a[:, None] ** 2 * lam + s[:, None] ** 2)) @ q.T
  return score_fn


def gaussian_task_score_fn(sde, mu, sigma):
  """The exact score of N(mu, sigma) for any conditioning task, as a prior score_fn.

  Each row's clean_mask (`sbmae.latents`: DIFFUSED, CLEAN or ABSENT per
  coordinate) sets its task: the DIFFUSED coordinates x_v are at time t, the
  CLEAN ones x_c are observed at time 0 and the ABSENT ones are marginalised
  out (their values must be 0, as the sampler zeroes them; other values give
  NaN, so a test catches a sampler that does not). The score on v is that of
  p_t(x_v | x_c), from the joint of (x_v at t, x_c at 0):
  N((a mu_v, mu_c), [[a^2 S_vv + s^2 I, a S_vc], [a S_cv, S_cc]]), solved per
  row as one D x D system (absent coordinates decoupled with unit variance).
  Entries on non-diffused coordinates are 0.

  Args:
    sde: forward SDE with marginal_coeffs(t) -> (alpha, std).
    mu: [D] mean.
    sigma: [D, D] covariance.

  Returns:
    score_fn(params, x [B, D], t [B], clean_mask [B, D]) -> [B, D].
  """
  mu, sigma = jnp.asarray(mu, jnp.float32), jnp.asarray(sigma, jnp.float32)

  def score_fn(params, x, t, clean_mask):
    del params
    a, s = sde.marginal_coeffs(t)
    diffused = clean_mask == latents.DIFFUSED
    absent = clean_mask == latents.ABSENT
    scale = jnp.where(diffused, a[:, None], jnp.where(absent, 0.0, 1.0))  # [B, D]
    cov = (scale[:, :, None] * sigma * scale[:, None, :]
           + jax.vmap(jnp.diag)(jnp.where(diffused, s[:, None] ** 2, 0.0) + absent))
    r = jnp.linalg.solve(cov, (x - scale * mu)[..., None])[..., 0]
    score = jnp.where(diffused, -r, 0.0)
    return jnp.where(jnp.all(jnp.where(absent, x == 0, True), -1, keepdims=True), score, jnp.nan)
  return score_fn


def gaussian_conditional(mu, sigma, observed, y):
  """Law of the unobserved coordinates of N(mu, sigma) given x[observed] = y[observed].

  Args:
    mu: [D] mean.
    sigma: [D, D] covariance.
    observed: bool [D] mask.
    y: [D] values (only the observed ones are read).

  Returns:
    (mean [U], covariance [U, U], gain [U, O]) of the unobserved coordinates.
  """
  o, u = observed, ~observed
  gain = sigma[np.ix_(u, o)] @ np.linalg.inv(sigma[np.ix_(o, o)])
  mean = mu[u] + gain @ (y[o] - mu[o])
  cov = sigma[np.ix_(u, u)] - gain @ sigma[np.ix_(o, u)]
  return mean, cov, gain


def gaussian_h(sigma):
  """H = E[s s^T] of whitened-reference N(0, sigma): Sigma - 2 I + Sigma^{-1}.

  For x ~ N(0, sigma) and the reference N(0, I) the score ratio is linear,
  s(x) = (I - Sigma^{-1}) x, hence this closed form.
  """
  sigma = np.asarray(sigma, np.float64)
  return sigma - 2 * np.eye(len(sigma)) + np.linalg.inv(sigma)


def bimodal_eigenvalue(a):
  """E[(d/dy log p(y) + y)^2] for p = (N(-a, 1 - a^2) + N(a, 1 - a^2)) / 2.

  The H eigenvalue of a unit-variance symmetric mixture direction (about 2.94
  for a = 0.9), by quadrature.
  """
  var = 1 - a * a
  y = np.linspace(-9, 9, 200001)
  g_plus = np.exp(-(y - a)**2 / (2 * var))
  g_minus = np.exp(-(y + a)**2 / (2 * var))
  p = 0.5 * (g_plus + g_minus) / np.sqrt(2 * np.pi * var)
  dlogp = -((y - a) * g_plus + (y + a) * g_minus) / (var * (g_plus + g_minus))
  return float(np.sum(p * (dlogp + y)**2) * (y[1] - y[0]))


# Synthetic latents of known structure for the reduction (bench_reduction.py and
# tests/test_reduction.py). Every block is standardised (mean 0, covariance I),
# rotated at random, and independent N(0, 1) outside its structured subspace, as
# unused VAE units are; each structured direction's H eigenvalue is known.


def student_t_eigenvalue(nu):
  """H eigenvalue J - 1 of a unit-variance Student-t direction (nu > 2).

  The Fisher information of t_nu with scale sigma is (nu + 1) / ((nu + 3)
  sigma^2); unit variance means sigma^2 = (nu - 2) / nu.
  """
  return (nu + 1) * nu / ((nu + 3) * (nu - 2)) - 1


def correlated_pair_eigenvalue(rho):
  """H_mm eigenvalue of a direction with correlation rho to another block.

  From H = Sigma - 2 I + Sigma^{-1} for Sigma = [[1, rho], [rho, 1]].
  """
  return rho * rho / (1 - rho * rho)


# name -> (per block: list of (kind, parameter)) for `synthetic_latents`.
# kinds: "shared" (2 dims: one 10-class mixture whose class all "shared" blocks
# share; parameter the within-class variance), "bimodal" (1 dim, parameter a),
# "student" (1 dim, parameter nu), "pair" (1 dim, correlation with the next
# block's "pair"; parameter rho).
STRUCTURES = {
    # Issue #15: PolyMNIST-like, shared digit + two private bimodal units.
    "polymnist": [[("shared", 0.1), ("bimodal", 0.97)],
                  [("shared", 0.1), ("bimodal", 0.97)],
                  [("shared", 0.1)], [("shared", 0.1)], [("shared", 0.1)]],
    # Private laws of unequal strength, linear coupling, empty blocks.
    "private": [[("student", 3.0), ("pair", 0.8)],
                [("pair", 0.8), ("bimodal", 0.9)],
                [("bimodal", 0.8), ("student", 4.0)],
                [], []],
    # Issue #15's scale check: PolyMNIST-10's 10 x 64 = 640 dims.
    "polymnist10": [[("shared", 0.1), ("bimodal", 0.97)]] * 2 + [[("shared", 0.1)]] * 8,
    # Everything at once, blocks of rank 0..4.
    "mixed": [[("shared", 0.4), ("bimodal", 0.95), ("pair", 0.7)],
              [("shared", 0.4), ("pair", 0.7), ("student", 3.0)],
              [("shared", 0.4)], [], [("pair", 0.9)], [("pair", 0.9)]],
}

_SHARED_CLASSES = 10


def _shared_means(rs, within_var):
  """10 class means in R^2 with mean 0 and covariance (1 - within_var) I."""
  mu = rs.randn(_SHARED_CLASSES, 2)
  mu -= mu.mean(0)
  w, v = np.linalg.eigh(mu.T @ mu / _SHARED_CLASSES)
  return mu @ v @ np.diag(np.sqrt((1 - within_var) / w)) @ v.T


def synthetic_latents(structure, n, seed, dim=64):
  """Samples latents of known structure.

  Args:
    structure: a key of STRUCTURES or a list in its format.
    n: number of samples.
    seed: numpy seed (the laws' parameters and the samples).
    dim: size of every block.

  Returns:
    (latents, truth, shared): latents name -> [n, dim] float32 (mean 0,
    covariance I in population); truth name -> (basis [dim, r] orthonormal,
    the true eigenvalue of each column or None where only `shared_eigenvalues`
    knows it, the kind of each column); shared name -> (class means [10, 2],
    within-class variance) of the blocks with a shared mixture.
  """
  spec = STRUCTURES[structure] if isinstance(structure, str) else structure
  rs = np.random.RandomState(seed)
  labels = rs.randint(_SHARED_CLASSES, size=n)
  pair = None  # the latent variable of an open "pair"
  latents, truth, shared = {}, {}, {}
  for m, parts in enumerate(spec):
    cols, lams, kinds = [], [], []
    for kind, p in parts:
      if kind == "shared":
        mu = _shared_means(rs, p)
        shared[f"m{m}"] = (mu, p)
        cols += [mu[labels] + np.sqrt(p) * rs.randn(n, 2)]
        lams += [None, None]
        kinds += ["shared", "shared"]
        continue
      if kind == "bimodal":
        y = rs.choice([-p, p], size=n) + np.sqrt(1 - p * p) * rs.randn(n)
        lam = bimodal_eigenvalue(p)
      elif kind == "student":
        y = rs.standard_t(p, size=n) * np.sqrt((p - 2) / p)
        lam = student_t_eigenvalue(p)
      elif kind == "pair":
        if pair is None:
          pair = rs.randn(n)
          y = pair
        else:
          y, pair = p * pair + np.sqrt(1 - p * p) * rs.randn(n), None
        lam = correlated_pair_eigenvalue(p)
      else:
        raise ValueError(f"unknown kind {kind!r}")
      cols.append(y[:, None])
      lams.append(lam)
      kinds.append(kind)
    r = sum(c.shape[1] for c in cols)
    y = np.concatenate(cols + [rs.randn(n, dim - r)], axis=1)
    rot = np.linalg.qr(rs.randn(dim, dim))[0]
    latents[f"m{m}"] = (y @ rot.T).astype(np.float32)
    truth[f"m{m}"] = (rot[:, :r], lams, kinds)
  return latents, truth, shared


def _class_posterior(ys, shared):
  """[n, 10] posterior of the shared class given every shared block's plane ys[name] [n, 2]."""
  logp = 0.0
  for n, (mu, v) in shared.items():
    logp = logp - np.sum((ys[n][:, None, :2] - mu[None]) ** 2, -1) / (2 * v)
  post = np.exp(logp - logp.max(1, keepdims=True))
  return post / post.sum(1, keepdims=True)


def shared_eigenvalues(latents, truth, shared, num=20000):
  """Monte Carlo eigenvalues of H_mm on the shared subspaces (exact score).

  With a class shared by all blocks, x_m's score ratio on its 2-d shared part
  y_m is E[-(y_m - mu_m,c) / v | all blocks] + y_m: the class posterior uses
  every block's shared coordinates.

  Args:
    latents, truth, shared: from `synthetic_latents`.
    num: samples used.

  Returns:
    name -> the 2 eigenvalues (descending) of H on its shared plane, in the
    order of the "shared" columns of truth[name].
  """
  ys = {n: latents[n][:num].astype(np.float64) @ truth[n][0][:, :2]
        for n in shared}
  post = _class_posterior(ys, shared)
  out = {}
  for n in shared:
    mu, v = shared[n]
    s = -(ys[n] - post @ mu) / v + ys[n]
    out[n] = np.sort(np.linalg.eigvalsh(s.T @ s / len(s)))[::-1]
  return out


def _structure_parameters(structure, latents):
  """name -> (kind, parameter) of each structured column, in `truth`'s column order."""
  spec = STRUCTURES[structure] if isinstance(structure, str) else structure
  out = {}
  for m, parts in enumerate(spec):
    cols = []
    for kind, p in parts:
      cols += [(kind, p)] * (2 if kind == "shared" else 1)
    out[f"m{m}"] = cols
  assert set(out) == set(latents), (sorted(out), sorted(latents))
  return out


def exact_scores(structure, latents, truth, shared):
  """The exact score grad_z log pi(z) of the law `synthetic_latents` drew, at its samples.

  Per structured coordinate y = basis^T z: "bimodal" -(y - a tanh(a y / v)) / v
  with v = 1 - a^2; "student" -(nu + 1) y / (nu sigma^2 + y^2), sigma^2 =
  (nu - 2) / nu; "shared" -(y - E[mu_c | every shared block]) / v; a "pair"
  (u, w) with w = rho u + sqrt(1 - rho^2) e the Gaussian -Sigma^{-1} (u, w);
  the rest of each block is N(0, I), score -z on it.

  Args:
    structure: the key or list given to `synthetic_latents`.
    latents, truth, shared: what it returned (latents unwhitened).

  Returns:
    name -> [n, dim] float64.
  """
  params = _structure_parameters(structure, latents)
  names = list(latents)
  z = {n: np.asarray(latents[n], np.float64) for n in names}
  y = {n: z[n] @ truth[n][0] for n in names}
  post = _class_posterior(y, shared) if shared else None
  pairs = [(n, j) for n in names for j, (kind, _) in enumerate(params[n]) if kind == "pair"]
  partner = {}
  for first, second in zip(pairs[::2], pairs[1::2]):
    partner[first], partner[second] = second, first
  out = {}
  for n in names:
    basis = truth[n][0]
    grad_y = np.zeros_like(y[n])
    for j, (kind, p) in enumerate(params[n]):
      t = y[n][:, j]
      if kind == "shared":
        mu, v = shared[n]
        grad_y[:, j] = -(t - post @ mu[:, j % 2]) / v
      elif kind == "bimodal":
        v = 1 - p * p
        grad_y[:, j] = -(t - p * np.tanh(p * t / v)) / v
      elif kind == "student":
        grad_y[:, j] = -(p + 1) * t / (p - 2 + t * t)
      elif kind == "pair":
        other_name, other_j = partner[(n, j)]
        grad_y[:, j] = -(t - p * y[other_name][:, other_j]) / (1 - p * p)
    out[n] = -(z[n] - y[n] @ basis.T) + grad_y @ basis.T
  return out


def sample_eigenvalues(structure, latents, truth, shared, whitening):
  """name -> the true_rank largest eigenvalues of H_mm of the whitened law, on these samples.

  What an estimator that sees only the whitened latents x = L^T (z - mean) can
  find: their law's exact score ratio s(x) = x + L^{-1} grad_z log pi(z)
  (`exact_scores`), and H_mm = mean over the samples of s_m s_m^T. It differs
  from the population's closed forms by the sample's own fluctuation (a heavy
  tail's sample variance moves the whitened law's scale), which no estimator
  on these samples can remove.

  Args:
    structure, latents, truth, shared: as for `exact_scores`.
    whitening: the `sbmae.latents.Whitening` fitted to `latents`.

  Returns:
    name -> eigenvalues [r], descending, r the block's number of structured
    columns.
  """
  grads = exact_scores(structure, latents, truth, shared)
  x = whitening.whiten({n: np.asarray(v, np.float64) for n, v in latents.items()})
  out = {}
  for n in latents:
    s = np.asarray(x[n], np.float64) + grads[n] @ np.asarray(
        whitening.unwhitener[n], np.float64)
    lam = np.linalg.eigvalsh(s.T @ s / len(s))[::-1]
    out[n] = lam[:truth[n][0].shape[1]]
  return out
