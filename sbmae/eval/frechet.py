"""Frechet distance between Gaussians fitted to feature sets (FID and kin).

  FD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}).

The matrix square root term is computed in the symmetric form
  tr (S1 S2)^{1/2} = tr (S1^{1/2} S2 S1^{1/2})^{1/2} = sum_i sqrt(lambda_i),
with lambda_i the eigenvalues of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}
(which is similar to S1 S2, so the two traces agree; by continuity also for
singular S1). Symmetric eigendecompositions replace pytorch-fid's
`scipy.linalg.sqrtm` of the non-symmetric S1 S2: no complex round-off to
discard and no eps offset for singular products (feature dimension above the
sample count, the usual case for 2048-d Inception features of a few hundred
images); eigenvalues below the round-off level of their matrices (negative ones
included) are set to zero. Values agree with the sqrtm route to round-off where
that route is well conditioned (tests/test_frechet.py checks both).

Everything runs in float64 numpy: the result is a difference of large traces
and loses digits in float32.
"""

import numpy as np


def statistics(features):
  """Mean and covariance of a feature set, as FID uses them.

  Args:
    features: [N, F] array, N >= 2.

  Returns:
    (mu [F], sigma [F, F]) float64; sigma is the unbiased (N - 1) covariance,
    as in pytorch-fid and the original TF implementation.
  """
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"need features of shape [N >= 2, F], got {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False, ddof=1).reshape(
      features.shape[1], features.shape[1])


def _clip_to_rank(evals, scale):
  """Zeroes eigenvalues below the round-off level `scale` * F * eps.

  Exact zeros of a singular PSD matrix come out of `eigh` as +-1e-16 * scale,
  and their square roots (1e-8 each) would add up to a visible error; the
  threshold is the usual numerical-rank tolerance (as in matrix_rank), taken
  relative to the norm of the matrices the eigenvalues were computed from.
  """
  tol = evals.size * np.finfo(np.float64).eps * scale
  return np.where(evals > tol, evals, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """Frechet (2-Wasserstein squared) distance between N(mu1, S1) and N(mu2, S2).

  Args:
    mu1: [F] mean of the first Gaussian.
    sigma1: [F, F] covariance of the first Gaussian (PSD, may be singular).
    mu2: [F] mean of the second Gaussian.
    sigma2: [F, F] covariance of the second Gaussian.

  Returns:
    The distance as a Python float (>= 0 up to round-off).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"shape mismatch: mu {mu1.shape}, {mu2.shape}; "
                     f"sigma {sigma1.shape}, {sigma2.shape}")
  # Symmetrise first: sample covariances are symmetric only up to round-off and
  # eigh reads one triangle.
  sigma1 = 0.5 * (sigma1 + sigma1.T)
  sigma2 = 0.5 * (sigma2 + sigma2.T)
  evals1, evecs1 = np.linalg.eigh(sigma1)
  norm1, norm2 = np.abs(evals1).max(), np.abs(np.linalg.eigvalsh(sigma2)).max()
  root1 = (evecs1 * np.sqrt(_clip_to_rank(evals1, norm1))) @ evecs1.T
  middle = root1 @ sigma2 @ root1
  evals = np.linalg.eigvalsh(0.5 * (middle + middle.T))
  tr_covmean = np.sqrt(_clip_to_rank(evals, norm1 * norm2)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def feature_distance(real, fake):
  """Frechet distance between Gaussians fitted to feature sets [N1, F] and [N2, F].

  Same value as `frechet_distance` of the `statistics` of each set. With
  fewer samples than features it avoids every F x F decomposition: the
  covariances are S_i = A_i^T A_i for the centred features A_i [N_i, F]
  divided by sqrt(N_i - 1), and S1^{1/2} S2 S1^{1/2} shares its non-zero
  eigenvalues with (A1 A2^T)(A1 A2^T)^T, so tr (S1 S2)^{1/2} is the sum of the
  singular values of the N1 x N2 matrix A1 A2^T.
  """
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if min(len(real), len(fake)) >= real.shape[1]:
    return frechet_distance(*statistics(real), *statistics(fake))
  a1 = (real - real.mean(0)) / np.sqrt(len(real) - 1)
  a2 = (fake - fake.mean(0)) / np.sqrt(len(fake) - 1)
  diff = real.mean(0) - fake.mean(0)
  cross = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
  return float(diff @ diff + np.sum(a1 ** 2) + np.sum(a2 ** 2) - 2.0 * cross)
