"""Latents after the autoencoders: whitening, the prior's flat layout, modality masks.

Everything downstream of the autoencoders works on *whitened* per-modality
latents, x_m = L_m^T (z_m - mu_m) with L_m L_m^T the empirical precision of
z_m, so that the reference density of the reduction is N(0, I) and the block
structure survives (DESIGN.md, "The maths"). `Whitening` is that map, fitted
once by the autoencoders stage. The prior sees the blocks concatenated in the
modalities' order (`flatten` / `unflatten`); a mask over modalities becomes a
mask over coordinates with `modality_mask_to_coords`.
"""

from typing import Sequence

import flax
import jax.numpy as jnp
import numpy as np

from sbmae import faults


def whitening(z, jitter: float = 1e-6):
  """Empirical whitening of one block: x = L^T (z - mu), L L^T the precision.

  Computed in float64 on the host (d x d matrices only).

  Args:
    z: [N, d] samples.
    jitter: added to the covariance diagonal, relative to the mean variance,
      so that a direction an autoencoder left unused still has a Cholesky
      factor.

  Returns:
    (mu [d], L^T [d, d], L^{-T} [d, d]) as float32 numpy arrays.
  """
  z = np.asarray(z, np.float64)
  mu = z.mean(0)
  cov = np.cov(z - mu, rowvar=False, bias=True).reshape(z.shape[1], -1)
  cov += jitter * np.trace(cov) / len(cov) * np.eye(len(cov))
  chol = np.linalg.cholesky(np.linalg.inv(cov))
  f32 = lambda a: np.asarray(a, np.float32)
  return f32(mu), f32(chol.T), f32(np.linalg.inv(chol.T))


@flax.struct.dataclass
class Whitening:
  """Per-modality whitening x = L^T (z - mean), L L^T = empirical precision."""
  mean: dict
  whitener: dict  # L^T
  unwhitener: dict  # L^{-T}

  @classmethod
  def fit(cls, latents, jitter=1e-6):
    """Fits the whitening of dict name -> latents [N, d] (see `whitening`)."""
    parts = {}
    for n, z in latents.items():
      try:
        parts[n] = whitening(z, jitter)
      except np.linalg.LinAlgError as e:
        raise ValueError(f"latents of modality {n!r} have a singular covariance even with "
                         f"jitter {jitter}: the autoencoder collapsed ({e})") from e
    return cls(*({n: jnp.asarray(p[i]) for n, p in parts.items()} for i in range(3)))

  def whiten(self, latents):
    """dict name -> z [.., d]  to  dict name -> x = L^T (z - mean)."""
    return {n: (z - self.mean[n]) @ self.whitener[n].T for n, z in latents.items()}

  def unwhiten(self, x):
    """Inverse of `whiten`: z = mean + L^{-T} x."""
    return {n: self.mean[n] + v @ self.unwhitener[n].T for n, v in x.items()}

  def save(self, path):
    """Writes the three dicts of arrays to one .npz file (atomically)."""
    with faults.atomic_write(path) as f:
      np.savez(f, **{f"{field}/{n}": v for field in ("mean", "whitener", "unwhitener")
                        for n, v in getattr(self, field).items()})

  @classmethod
  def load(cls, path):
    """Reads a file written by `save`."""
    with np.load(path) as f:
      part = lambda p: {k.split("/", 1)[1]: jnp.asarray(f[k]) for k in f if k.startswith(p)}
      return cls(part("mean/"), part("whitener/"), part("unwhitener/"))


def flatten(latents, names):
  """dict name -> [N, d_m]  to  [N, D] in the order of `names`."""
  return jnp.concatenate([jnp.asarray(latents[n]) for n in names], axis=-1)


def unflatten(flat, names, dims):
  """[N, D] to dict name -> [N, d_m] (inverse of `flatten`)."""
  splits = np.cumsum(dims)[:-1]
  return dict(zip(names, jnp.split(flat, splits, axis=-1)))


# Values of the score network's per-coordinate conditioning input (the
# `clean_mask` argument of `sbmae.models.score`): a diffused coordinate (to be
# generated), a clean conditioning value, an absent modality (value zeroed).
DIFFUSED, CLEAN, ABSENT = 0.0, 1.0, -1.0


def modality_mask_to_coords(mask, dims: Sequence[int]):
  """Expands a mask over modalities to a mask over latent coordinates.

  Args:
    mask: [..., M] array (bool or float), one entry per modality.
    dims: the M static block sizes.

  Returns:
    [..., D] array (D = sum(dims)), each modality's entry repeated over its block.
  """
  dims = np.asarray(dims, dtype=np.int64)
  return jnp.repeat(jnp.asarray(mask), dims, axis=-1,
                    total_repeat_length=int(dims.sum()))
