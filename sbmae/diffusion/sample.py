"""Any-subset predictor-corrector sampling from the joint latent prior.

A pure library module (no file I/O, no checkpoints): `get_sampler` returns a
jitted function that, given the latents of an observed subset of modalities,
samples the others. The observed set is a boolean mask over modalities passed
as data, so one compiled function serves all 2^M subsets (for a given batch
size and mask rank); unconditional generation is the all-False mask.

Method (score_sde's PC sampler with imputation by replacement). On the time
grid T = t_0 > t_1 > ... > t_K = eps, at each t_i:
  * corrector: `corrector_steps` Langevin steps at t_i,
  * predictor: one Euler-Maruyama step of the reverse SDE from t_i to t_{i+1}
    (the last one, into t_K, takes the mean only: fresh noise right before the
    final denoising would only be partly removed by it),
and before every score evaluation the observed coordinates are set either to
the observed latent diffused to t with fresh noise (alpha(t) y + std(t) z), or,
with `clean_conditioning` (a model trained with conditioning tasks, see
`sbmae.diffusion.losses`), to the clean observed latent flagged CLEAN in the model's
conditioning input. At t_K = eps the unobserved coordinates take the denoised
mean (Tweedie): since x_t = alpha x_0 + std z,
  E[x_0 | x_t] = (x_t + std^2 * grad log p_t(x_t)) / alpha,
and the observed coordinates return the observed values exactly.

Guidance (for a model trained with `absent_prob` > 0, so it knows the
scores of tasks with some modalities ABSENT: zeroed and flagged). Two terms
on the score of the unobserved modalities u given the observed ones o:
  s_cond + w (s_cond - s_absent) + v (s_cond - s_marg).
  * Classifier-free guidance (`guidance` = w): s_absent is the score of the
    same x_u with the observed modalities absent, i.e. of their marginal
    p_t(x_u); it sharpens the observation's likelihood p_t(x_o | x_u)^(1 + w).
  * Joint guidance (`joint_guidance` = v): s_marg holds, on each unobserved
    modality m, its score with every other modality absent (its marginal
    p_t(x_m)); it tilts towards tuples whose modalities explain each other,
    including the unobserved ones among themselves. It is the only guidance
    that acts on unconditional generation (nothing observed, where
    s_absent = s_cond).
As a vector field the sum is the gradient in x_u of
  (1 + w + v) log p_t(x_u, x_o) - w log p_t(x_u) - v sum_{m in u} log p_t(x_m),
the score of p(x_u | x_o) p(x_o | x_u)^w (p(x_u, x_o) / prod_{m in u} p(x_m))^v
(at every t; the sampler follows these scores, which are not the diffusion of
one tilted density). All tasks run as one network call on (1 + [w > 0] +
R [v > 0]) B rows, R = M - `min_observed` (the marginals of the modalities
that can be unobserved); w = v = 0 is the unguided sampler exactly.

Replacement is approximate even with the exact score: the unobserved
coordinates follow the joint score at an observed value that is not
consistent with their own past, and only the Langevin steps pull them back to
the conditional. On a 5-d Gaussian with the analytic score (tests/
test_sample.py) the conditional mean is off by up to ~0.23 conditional
standard deviations at 100 steps with one corrector step and ~0.13 with two,
and it shrinks with more steps (it is larger for ill-conditioned covariances);
clean conditioning with a model trained for it has no such bias.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sbmae.latents import ABSENT
from sbmae.latents import CLEAN
from sbmae.latents import DIFFUSED
from sbmae.latents import modality_mask_to_coords


def joint_rows(observed_mask, dims: Sequence[int], num_rows: int):
  """Coordinate masks of the modalities whose marginal scores joint guidance needs.

  Args:
    observed_mask: bool [M] or [B, M].
    dims: the M static block sizes.
    num_rows: static R, 0 <= R <= M; every example must have at most R
      unobserved modalities.

  Returns:
    bool [R, 1 or B, D]: row r holds, per example, the coordinates of its r-th
    unobserved modality in index order (then its observed ones, whose marginal
    scores nothing uses). R = M gives every modality once, in index order,
    whatever the mask (then the rows do not depend on it).
  """
  num_modalities = len(dims)
  if num_rows == num_modalities:
    return np.repeat(np.eye(num_modalities, dtype=bool), dims, axis=1)[:, None]
  mask = jnp.atleast_2d(jnp.asarray(observed_mask, bool))  # [1 or B, M]
  order = jnp.argsort(mask, axis=-1, stable=True)[:, :num_rows]  # unobserved first
  rows = jax.nn.one_hot(order, num_modalities, dtype=bool)  # [1 or B, R, M]
  return jnp.swapaxes(modality_mask_to_coords(rows, dims), 0, 1)


def get_guided_score_fn(score_fn, guidance: float, joint_guidance: float = 0.0,
                        dims: Sequence[int] = ()):
  """Classifier-free and joint guidance (see the module docstring).

  Args:
    score_fn: score_fn(params, x [B, D], t [B], clean_mask [B, D]) -> [B, D].
    guidance: the classifier-free weight w (static).
    joint_guidance: the joint weight v (static).
    dims: static per-modality latent sizes (M blocks of D); needed when v > 0.

  Returns:
    guided(params, x, t, clean_mask, observed [B, D] bool, own=None) -> [B, D]:
    s_cond + w (s_cond - s_absent) + v (s_cond - s_marg), with
    s_cond = score_fn(x, t, clean_mask), s_absent the score with the
    `observed` coordinates zeroed and ABSENT and s_marg, on modality m's
    coordinates, the score with every other modality zeroed and ABSENT; all
    from one network call. `own` ([R, 1 or B, D] bool, `joint_rows`) names
    the modalities whose marginals are computed, one per row; None: all M.
    Only the unobserved coordinates of the result are meaningful, and only
    where `own` covers them. w = v = 0 returns score_fn's value unchanged.
  """
  guidance, joint_guidance = float(guidance), float(joint_guidance)
  dims = tuple(int(d) for d in dims)
  if joint_guidance and not dims:
    raise ValueError("joint guidance needs the modalities' latent sizes (dims)")

  def guided(params, x, t, clean_mask, observed, own=None):
    if not guidance and not joint_guidance:
      return score_fn(params, x, t, clean_mask)
    xs, masks = [x[None]], [clean_mask[None]]
    if guidance:
      xs.append(jnp.where(observed, 0.0, x)[None])
      masks.append(jnp.where(observed, ABSENT, clean_mask)[None])
    if joint_guidance:
      if own is None:
        own = joint_rows(np.zeros(len(dims), bool), dims, len(dims))
      xs.append(jnp.where(own, x, 0.0))
      masks.append(jnp.where(own, clean_mask, ABSENT))
    xs, masks = jnp.concatenate(xs), jnp.concatenate(masks)  # [tasks, B, D]
    tasks, b = xs.shape[:2]
    out = score_fn(params, xs.reshape(tasks * b, -1), jnp.tile(t, tasks),
                   masks.reshape(tasks * b, -1)).reshape(tasks, b, -1)
    s_cond = out[0]
    result = s_cond
    if guidance:
      result = result + guidance * (s_cond - out[1])
    if joint_guidance:
      s_marg = jnp.sum(jnp.where(own, out[tasks - len(own):], 0.0), axis=0)
      result = result + joint_guidance * (s_cond - s_marg)
    return result

  return guided


def get_sampler(sde, score_fn, dims: Sequence[int], *, num_steps: int = 100,
                corrector_steps: int = 1, snr: float = 0.16, eps: float = 1e-3,
                clean_conditioning: bool = False, guidance: float = 0.0,
                joint_guidance: float = 0.0, compiler_options=None):
  """Builds the any-subset predictor-corrector sampler.

  Args:
    sde: forward SDE (`sbmae.diffusion.sde`), giving sde(), marginal_coeffs(),
      prior_sampling() and langevin_alpha().
    score_fn: score_fn(params, x [B, D], t [B], clean_mask [B, D]) -> [B, D],
      e.g. from `sbmae.diffusion.losses.get_score_fn`; clean_mask holds DIFFUSED,
      CLEAN or ABSENT per coordinate.
    dims: static per-modality latent sizes.
    num_steps: predictor steps (score evaluations per sample:
      num_steps * (1 + corrector_steps) + 1, each on 2B rows with
      classifier-free guidance, (2 + M - min_observed) B with joint guidance
      too).
    corrector_steps: Langevin steps before each predictor step (0: none).
    snr: Langevin signal-to-noise target. The step size follows score_sde's
      LangevinCorrector, 2 alpha (snr ||z|| / ||score||)^2, with the norms
      taken over the unobserved coordinates only (the ones that move) and the
      squared norms averaged over the batch:
      step = 2 alpha snr^2 / mean(score_u^2), since E||z_u||^2 = n_u.
    eps: final time; the reverse SDE is integrated from T down to eps.
    clean_conditioning: hold observed coordinates at their clean values and
      flag them CLEAN (for models trained with conditioning tasks) instead of
      diffusing them with fresh noise.
    guidance: classifier-free guidance weight w (static; 0: unguided, no
      extra network evaluations). Needs a model trained with absent
      modalities.
    joint_guidance: joint guidance weight v (static; 0: none, no extra
      network evaluations). Needs a model trained with absent modalities
      (each modality's marginal).
    compiler_options: XLA options of the sampler's compilation, or None
      (e.g. `sbmae.stages.prior.compiler_options` for a U-Net).

  Returns:
    A jitted sample(rng, params, observed, observed_mask, min_observed=0) ->
    latents [B, D]: `observed` is [B, D] (values on unobserved modalities are
    ignored), `observed_mask` a bool [M] (same subset for the whole batch) or
    [B, M] mask. `min_observed` (static) promises that every example observes
    at least that many modalities: joint guidance then computes M -
    min_observed marginal scores instead of M (the others belong to observed
    modalities), (M - k) / M of its rows for subsets of size k; if an example
    observes fewer, the whole batch comes back NaN (the Langevin step size is
    a batch mean). It compiles once per (B, mask rank,
    min_observed, params structure), never per subset.
  """
  dims = tuple(int(d) for d in dims)
  guided_score_fn = get_guided_score_fn(score_fn, guidance, joint_guidance, dims)
  # Static time grid with num_steps intervals, ending exactly at eps.
  times = np.linspace(sde.T, eps, num_steps + 1).astype(np.float32)

  def sample(rng, params, observed, observed_mask, min_observed=0):
    if not 0 <= min_observed <= len(dims):
      raise ValueError(f"min_observed={min_observed}: expected 0..{len(dims)}")
    observed = jnp.asarray(observed, jnp.float32)
    observed_mask = jnp.asarray(observed_mask, bool)
    batch = observed.shape[0]
    obs = jnp.broadcast_to(modality_mask_to_coords(observed_mask, dims), observed.shape)
    own = joint_rows(observed_mask, dims, len(dims) - min_observed) if joint_guidance else None
    cond = jnp.where(obs, CLEAN if clean_conditioning else DIFFUSED, DIFFUSED)
    free = 1.0 - obs.astype(observed.dtype)
    num_free = jnp.maximum(free.sum(), 1.0)

    def impose(x, t, key):
      if clean_conditioning:
        target = observed
      else:
        alpha, std = sde.marginal_coeffs(t)
        target = alpha * observed + std * jax.random.normal(key, x.shape)
      return jnp.where(obs, target, x)

    def score(x, t):
      return guided_score_fn(params, x, jnp.full((batch,), t), cond, obs, own)

    def step(i, x):
      t, t_next = grid[i], grid[i + 1]
      keys = jax.random.split(jax.random.fold_in(loop_key, i),
                              2 * corrector_steps + 2)
      for j in range(corrector_steps):
        x = impose(x, t, keys[2 * j])
        g = score(x, t)
        mean_sq = jnp.sum(free * g * g) / num_free
        step_size = 2.0 * sde.langevin_alpha(t) * snr ** 2 / jnp.maximum(
            mean_sq, 1e-12)
        z = jax.random.normal(keys[2 * j + 1], x.shape)
        x = x + step_size * g + jnp.sqrt(2.0 * step_size) * z
      # Euler-Maruyama on the reverse SDE dx = [f - g^2 score] dt + g dW, dt < 0;
      # the last step, right before the final denoising, takes the mean only.
      x = impose(x, t, keys[-2])
      dt = t_next - t
      drift, diffusion = sde.sde(x, jnp.full((batch,), t))
      drift = drift - diffusion ** 2 * score(x, t)
      z = jax.random.normal(keys[-1], x.shape)
      noise_scale = jnp.where(i == num_steps - 1, 0.0, jnp.sqrt(-dt))
      return x + drift * dt + diffusion * noise_scale * z

    grid = jnp.asarray(times)
    init_key, loop_key, final_key = jax.random.split(rng, 3)
    x = sde.prior_sampling(init_key, observed.shape)
    x = jax.lax.fori_loop(0, num_steps, step, x)
    t_end = times[-1]
    x = impose(x, t_end, final_key)
    alpha, std = sde.marginal_coeffs(t_end)
    denoised = (x + std ** 2 * score(x, t_end)) / alpha
    # The Langevin step size is shared by the batch: one broken example spoils it.
    broken = jnp.any(jnp.sum(observed_mask, axis=-1) < min_observed)
    return jnp.where(broken, jnp.nan, jnp.where(obs, observed, denoised))

  return jax.jit(sample, static_argnames="min_observed",
                 compiler_options=compiler_options)
