"""Denoising score matching loss for the joint latent prior.

Conditioning tasks. Every training example is given a conditioning task: the
number k of clean modalities is drawn from `clean_count_probs` over 0..M-1
(never all M: there would be nothing to denoise), then a uniform random subset
of that size is kept clean (x_t = x_0 on its blocks, flagged CLEAN in the
network's conditioning input). With probability `absent_prob` the clean
modalities of an example are instead made ABSENT (zeroed and flagged): the
network then learns the marginal of the diffused modalities, the "unguided"
score that classifier-free guidance contrasts with (`sbmae.diffusion.sample`).

Normalisation. Each example's squared error is averaged over its own diffused
coordinates, then examples are averaged; so every example weighs 1/B and a
task's share of the gradient is the share of examples drawn for it. (With one
mean over all diffused coordinates of the batch, an example with one diffused
modality would weigh 1/M of an unconditional one.)
"""

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from sbmae.diffusion import sde as sde_lib
from sbmae.latents import ABSENT
from sbmae.latents import CLEAN
from sbmae.latents import modality_mask_to_coords


def clean_count_probs(dist: Union[str, Sequence[float]], uncond_share: float,
                      num_modalities: int) -> np.ndarray:
  """The distribution over the number of clean modalities k = 0..M-1.

  Args:
    dist: "uniform" (every k equally likely), "none" (k = 0 always: an
      unconditional prior, sampled by replacement) or M non-negative weights
      for k = 0..M-1 (normalised here), as a sequence or a comma-separated
      string (the form a config flag takes). Weights proportional to C(M, k),
      e.g. "1,5,10,10,5" for M = 5, give the task mix of independent
      Bernoulli(0.5) masking (less its useless all-clean case).
    uncond_share: share of examples forced to k = 0 (unconditional), mixed in
      on top of `dist`: p = uncond_share [k = 0] + (1 - uncond_share) dist.
    num_modalities: M.

  Returns:
    float64 [M] probabilities summing to 1.
  """
  m = int(num_modalities)
  problem = (f"prior.clean_count_dist={dist!r}: expected 'uniform', 'none' or {m} "
             f"non-negative weights for k = 0..{m - 1}, not all zero")
  if dist == "uniform":
    weights = np.ones(m)
  elif dist == "none":
    weights = np.eye(m)[0]
  else:
    try:
      weights = np.asarray(dist.split(",") if isinstance(dist, str) else dist, np.float64)
    except ValueError:
      raise ValueError(problem) from None
    if weights.shape != (m,) or np.any(weights < 0) or weights.sum() <= 0:
      raise ValueError(problem)
  if not 0.0 <= uncond_share <= 1.0:
    raise ValueError(f"prior.uncond_share={uncond_share} is not in [0, 1]")
  probs = (1.0 - uncond_share) * weights / weights.sum()
  probs[0] += uncond_share
  return probs


def random_subsets(rng, counts, num_modalities: int):
  """Uniform random subsets of the given sizes.

  Args:
    rng: key.
    counts: int [B], each in 0..M.
    num_modalities: M (static).

  Returns:
    bool [B, M] with counts[i] True entries in row i, every subset of that size
    equally likely (the modalities of the counts[i] smallest of M uniforms).
  """
  u = jax.random.uniform(rng, (counts.shape[0], num_modalities))
  rank = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
  return rank < counts[:, None]


def draw_tasks(rng, batch_size: int, probs, absent_prob: float = 0.0):
  """Draws a conditioning task per example (see the module docstring).

  Args:
    rng: key.
    batch_size: B.
    probs: [M] probabilities of k = 0..M-1 clean modalities.
    absent_prob: probability that an example's clean modalities become absent.

  Returns:
    (counts int [B], clean bool [B, M], absent bool [B, M]); clean and absent
    are disjoint, `counts` is the drawn k (= clean + absent modalities).
  """
  probs = np.asarray(probs, np.float64)
  k_key, set_key, absent_key = jax.random.split(rng, 3)
  counts = jax.random.choice(k_key, len(probs), (batch_size,),
                             p=jnp.asarray(probs, jnp.float32))
  chosen = random_subsets(set_key, counts, len(probs))
  if absent_prob > 0:
    drop = jax.random.bernoulli(absent_key, absent_prob, (batch_size, 1))
  else:
    drop = jnp.zeros((batch_size, 1), bool)
  return counts, chosen & ~drop, chosen & drop


def get_per_example_loss_fn(sde, model, dims: Sequence[int], *, eps: float = 1e-5,
                            gaussian_base: bool = True):
  """The DSM loss of each example for given clean and absent modalities.

  With x_t = alpha(t) x_0 + std(t) z, t ~ U[eps, T], the loss of an example is
  the mean of (eps_hat(x_t, t) - z)^2 over its diffused coordinates: std(t)^2-
  weighted score matching for score = -eps_hat / std (`sbmae.models.score`).
  Clean coordinates hold x_0, absent ones 0; neither enters the loss.

  Args:
    sde: forward SDE (`sbmae.diffusion.sde`).
    model: Flax module called as model.apply({'params': p}, x, t, clean_mask).
    dims: static per-modality latent sizes (sum = D).
    eps: smallest diffusion time sampled (avoids std(t) -> 0).
    gaussian_base: predict eps as the N(0, I) solution + network
      (`get_eps_fn`).

  Returns:
    fn(params, rng, batch [B, D], clean [B, M] bool, absent [B, M] bool) -> [B].
  """
  dims = tuple(int(d) for d in dims)
  eps_fn = get_eps_fn(sde, model, gaussian_base)

  def per_example(params, rng, batch, clean, absent):
    if batch.shape[-1] != sum(dims):
      raise ValueError(f"batch has {batch.shape[-1]} coordinates, dims={dims}.")
    t_key, noise_key = jax.random.split(rng)
    b = batch.shape[0]
    t = jax.random.uniform(t_key, (b,), minval=eps, maxval=sde.T)
    noise = jax.random.normal(noise_key, batch.shape, batch.dtype)
    alpha, std = sde.marginal_coeffs(t)
    x_t = (sde_lib.expand_like(alpha, batch) * batch
           + sde_lib.expand_like(std, batch) * noise)
    clean_c = modality_mask_to_coords(clean, dims)
    absent_c = modality_mask_to_coords(absent, dims)
    x_t = jnp.where(clean_c, batch, jnp.where(absent_c, 0.0, x_t))
    cond = CLEAN * clean_c.astype(batch.dtype) + ABSENT * absent_c.astype(batch.dtype)
    eps_hat = eps_fn(params, x_t, t, cond)
    weight = 1.0 - (clean_c | absent_c).astype(batch.dtype)
    return jnp.sum(weight * (eps_hat - noise) ** 2, axis=-1) / jnp.maximum(
        jnp.sum(weight, axis=-1), 1.0)

  return per_example


def get_dsm_loss_fn(sde, model, dims: Sequence[int], *,
                    clean_count_probs: Optional[Sequence[float]] = None,
                    absent_prob: float = 0.0, eps: float = 1e-5,
                    gaussian_base: bool = True):
  """Builds the training loss: tasks drawn per example, per-example normalisation.

  Args:
    sde: forward SDE (`sbmae.sde`).
    model: Flax module called as model.apply({'params': p}, x, t, clean_mask).
    dims: static per-modality latent sizes (sum = D).
    clean_count_probs: [M] probabilities of k = 0..M-1 clean modalities
      (`clean_count_probs`); None: k = 0 always (unconditional training).
    absent_prob: probability that an example's clean modalities are made
      absent instead (classifier-free guidance training).
    eps: smallest diffusion time sampled.
    gaussian_base: see `get_per_example_loss_fn`.

  Returns:
    loss_fn(params, rng, batch [B, D]) -> (loss, metrics) with metrics "loss",
    "clean_fraction" (share of clean coordinates), "absent_share" (share of
    examples whose conditioning was made absent) and "share_k{k}" for
    k = 0..M-1: the realised share of the loss weight on examples drawn with k
    clean (or absent) modalities.
  """
  m = len(dims)
  probs = np.eye(m)[0] if clean_count_probs is None else np.asarray(clean_count_probs)
  if probs.shape != (m,):
    raise ValueError(f"clean_count_probs has shape {probs.shape}, expected ({m},)")
  per_example = get_per_example_loss_fn(sde, model, dims, eps=eps,
                                        gaussian_base=gaussian_base)

  def loss_fn(params, rng, batch):
    task_key, loss_key = jax.random.split(rng)
    counts, clean, absent = draw_tasks(task_key, batch.shape[0], probs, absent_prob)
    loss = jnp.mean(per_example(params, loss_key, batch, clean, absent))
    clean_c = modality_mask_to_coords(clean, dims)
    metrics = {"loss": loss, "clean_fraction": jnp.mean(clean_c.astype(jnp.float32)),
               "absent_share": jnp.mean(jnp.any(absent, axis=-1).astype(jnp.float32))}
    for k in range(m):  # every example weighs 1/B
      metrics[f"share_k{k}"] = jnp.mean((counts == k).astype(jnp.float32))
    return loss, metrics

  return loss_fn


def get_eps_fn(sde, model, gaussian_base: bool = True):
  """The noise prediction used by the loss and the sampler.

  With `gaussian_base`, eps_hat(x, t) = std x / (alpha^2 + std^2) + net(x, t),
  (alpha, std) = marginal_coeffs(t): the first term is E[eps | x_t], the exact
  noise prediction when the data are N(0, I) (x_t ~ N(0, alpha^2 + std^2), so
  the score is -x_t / (alpha^2 + std^2)), which whitened (and reduced) latents
  are to second order, so the network only learns how the latents depart from
  independence. Under the VP-SDE alpha^2 + std^2 = 1 and the term is std x; under
  the VE-SDE it is std x / (1 + std^2). Without it an under-trained network has
  no notion of the identity map at large t and the reverse SDE drifts away.

  Args:
    sde: the forward SDE (provides std(t)).
    model: a module called as model.apply({'params': p}, x, t, clean_mask).
    gaussian_base: add the N(0, I) solution std x / (alpha^2 + std^2).

  Returns:
    eps_fn(params, x, t, clean_mask) -> eps_hat, shaped like x.
  """
  def eps_fn(params, x, t, clean_mask):
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    eps = model.apply({"params": params}, x, t, clean_mask)
    if gaussian_base:
      alpha, std = sde.marginal_coeffs(t)
      eps = eps + sde_lib.expand_like(std / (alpha ** 2 + std ** 2), x) * x
    return eps
  return eps_fn


def get_score_fn(sde, model, gaussian_base: bool = True):
  """Wraps an eps-predicting network as a score function.

  Args:
    sde: the forward SDE (provides std(t)).
    model: a module called as model.apply({'params': p}, x, t, clean_mask).
    gaussian_base: see `get_eps_fn`.

  Returns:
    score_fn(params, x, t, clean_mask) -> -eps_hat / std(t), shaped like x.
  """
  eps_fn = get_eps_fn(sde, model, gaussian_base)

  def score_fn(params, x, t, clean_mask):
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    _, std = sde.marginal_coeffs(t)
    return -eps_fn(params, x, t, clean_mask) / sde_lib.expand_like(std, x)
  return score_fn
