"""Denoising score matching loss for the joint latent prior."""

from typing import Sequence

import jax
import jax.numpy as jnp

from sbmae.diffusion import sde as sde_lib
from sbmae.latents import modality_mask_to_coords
from sbmae.models import score as score_lib


def get_dsm_loss_fn(sde, model, dims: Sequence[int], *, mask_prob: float = 0.0,
                    eps: float = 1e-5, gaussian_base: bool = True):
  """Builds the denoising score matching loss of an eps-predicting network.

  With x_t = alpha(t) x_0 + std(t) z, t ~ U[eps, T], the loss is
  E ||eps_hat(x_t, t) - z||^2, which equals std(t)^2-weighted score matching
  for score = -eps_hat / std (see `sbmae.models.score`), averaged over the
  diffused coordinates of the batch.

  Random modality masking (conditional training): when mask_prob > 0, each
  modality of each example is, with probability mask_prob, kept clean
  (x_t = x_0 on its block), flagged with 1 in the model's clean-mask input and
  left out of the loss. With mask_prob = 0 the clean mask is all zeros.

  Args:
    sde: forward SDE (`sbmae.diffusion.sde`).
    model: Flax module called as model.apply({'params': p}, x, t, clean_mask).
    dims: static per-modality latent sizes (sum = D).
    mask_prob: probability that a modality is kept clean.
    eps: smallest diffusion time sampled (avoids std(t) -> 0).
    gaussian_base: predict eps as std(t) x_t + network (`score.get_eps_fn`).

  Returns:
    loss_fn(params, rng, batch [B, D]) -> (loss, metrics) with metrics
    {"loss", "clean_fraction"}.
  """
  dims = tuple(int(d) for d in dims)
  eps_fn = score_lib.get_eps_fn(sde, model, gaussian_base)

  def loss_fn(params, rng, batch):
    if batch.shape[-1] != sum(dims):
      raise ValueError(f"batch has {batch.shape[-1]} coordinates, dims={dims}.")
    t_key, noise_key, mask_key = jax.random.split(rng, 3)
    b = batch.shape[0]
    t = jax.random.uniform(t_key, (b,), minval=eps, maxval=sde.T)
    noise = jax.random.normal(noise_key, batch.shape, batch.dtype)
    alpha, std = sde.marginal_coeffs(t)
    x_t = (sde_lib.expand_like(alpha, batch) * batch
           + sde_lib.expand_like(std, batch) * noise)
    if mask_prob > 0:
      clean_modalities = jax.random.bernoulli(mask_key, mask_prob, (b, len(dims)))
      clean = modality_mask_to_coords(clean_modalities, dims).astype(batch.dtype)
      x_t = jnp.where(clean > 0, batch, x_t)
    else:
      clean = jnp.zeros_like(batch)
    eps_hat = eps_fn(params, x_t, t, clean)
    weight = 1.0 - clean
    # Mean over diffused coordinates, so the loss scale does not depend on how
    # many modalities happened to be masked in this batch.
    loss = jnp.sum(weight * (eps_hat - noise) ** 2) / jnp.maximum(
        jnp.sum(weight), 1.0)
    return loss, {"loss": loss, "clean_fraction": jnp.mean(clean)}

  return loss_fn
