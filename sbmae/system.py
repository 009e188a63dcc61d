"""The trained system in one object: encode, sample any subset, decode.

`MultimodalModel` bundles the per-modality autoencoders, the latent whitening,
the optional reduction and the joint prior, with jitted `encode`, `decode` and
`generate`. `load(workdir)` rebuilds it from a finished run (with `build`, the
only functions here that read files; `sbmae.diffusion.sample` itself stays pure):

  from sbmae import system
  mm = system.load("/tmp/sbmae_quick")
  out = mm.generate(jax.random.PRNGKey(0), {"m0": images}, observed=["m0"])
  out["m3"]  # float32 [B, 28, 28, 3]: modality 3 generated from modality 0
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sbmae import errors
from sbmae import latents as latents_lib
from sbmae import rundir
from sbmae import stages
from sbmae.data import registry
from sbmae.diffusion import sample as sample_lib
from sbmae.stages import autoencoders
from sbmae.stages import prior
from sbmae.stages import reduce


class MultimodalModel:
  """Autoencoders + whitening + optional reduction + joint prior + sampler.

  Attributes:
    modalities: tuple of `sbmae.data.modalities.Modality`.
    names: modality names in latent order.
    dims: latent block sizes seen by the prior (reduced ranks when reducing).
    reduction: a `sbmae.reduction.reduction.Reduction` or None.
  """

  def __init__(self, modalities, ae_models, ae_params, stats, reduction, sde, score_fn,
               prior_params, sampling_config, compiler_options=None):
    self.modalities = tuple(modalities)
    self.names = tuple(m.name for m in modalities)
    self.ae_params, self.prior_params = ae_params, prior_params
    self.stats, self.reduction = stats, reduction
    if reduction is None:
      self.dims = tuple(int(stats.mean[n].shape[0]) for n in self.names)
    else:
      self.dims = tuple(int(reduction.ranks[n]) for n in self.names)
    self._encode_ae = autoencoders.encode_fn(ae_models)
    self._decode_ae = autoencoders.decode_fn(ae_models)
    self.sampler = sample_lib.get_sampler(
        sde, score_fn, self.dims, num_steps=sampling_config.num_steps,
        corrector_steps=sampling_config.corrector_steps, snr=sampling_config.snr,
        eps=sampling_config.eps, clean_conditioning=sampling_config.clean_conditioning,
        guidance=sampling_config.guidance,
        # Runs saved before joint guidance existed sampled without it.
        joint_guidance=sampling_config.get("joint_guidance", 0.0),
        compiler_options=compiler_options)

  @functools.partial(jax.jit, static_argnums=0)
  def latents_to_flat(self, latents):
    """Whitened per-modality latents -> the prior's flat latent [B, D]."""
    if self.reduction is not None:
      latents = self.reduction.project(latents)
    return latents_lib.flatten(latents, self.names)

  @functools.partial(jax.jit, static_argnums=0)
  def flat_to_latents(self, flat, rng=None):
    """The prior's flat latent -> whitened per-modality latents.

    With a reduction, the discarded directions are drawn from N(0, I) when `rng`
    is given (exact sampling from the ridge approximation) and set to 0 (the
    mean) otherwise.
    """
    latents = latents_lib.unflatten(flat, self.names, self.dims)
    if self.reduction is not None:
      latents = self.reduction.lift(latents, rng)
    return latents

  def check_batch(self, batch, required):
    """Raises DataError unless `batch` holds `required` with this model's shapes.

    Every modality given must be numeric [B, *shape] with one B and finite
    values; names that are not modalities (e.g. "label") are ignored.
    """
    missing = [n for n in required if n not in batch]
    if missing:
      raise errors.DataError(f"batch lacks the observed modalities {missing}; "
                             f"it has {sorted(batch)}")
    sizes = {}
    for m in self.modalities:
      if m.name not in batch:
        continue
      x = batch[m.name]
      shape, dtype = tuple(np.shape(x)), getattr(x, "dtype", np.asarray(x).dtype)
      if shape[1:] != tuple(m.shape) or not (np.issubdtype(dtype, np.number)
                                             or dtype == bool):
        raise errors.DataError(
            f"modality {m.name!r}: got {dtype} {list(shape)}, expected [B, "
            f"{', '.join(map(str, m.shape))}] ({m.kind}, values in [0, 1])")
      errors.check_finite_rows(np.asarray(x), f"modality {m.name!r} of the batch")
      sizes[m.name] = shape[0]
    if len(set(sizes.values())) > 1:
      raise errors.DataError(f"modalities have different batch sizes {sizes}")
    if not sizes:
      raise errors.DataError(f"batch holds none of the modalities {self.names}; "
                             "give at least one to fix the batch size")

  def encode(self, batch):
    """dict name -> data [B, ...] for every modality -> flat latent [B, D]."""
    self.check_batch(batch, self.names)
    return self._encode(batch)

  def _encode(self, batch):
    """`encode` of a batch already checked."""
    z = self._encode_ae(self.ae_params, {n: batch[n] for n in self.names})
    return self.latents_to_flat(self.stats.whiten(z))

  def decode(self, flat, rng=None):
    """Flat latent [B, D] -> dict name -> decoder mean [B, ...]."""
    z = self.stats.unwhiten(self.flat_to_latents(flat, rng))
    return self._decode_ae(self.ae_params, z)

  def generate(self, rng, batch, observed, decode_rng=None):
    """Samples the unobserved modalities given the observed ones.

    Args:
      rng: sampling key.
      batch: dict name -> data [B, ...] holding at least the observed modalities.
      observed: names of the observed modalities (may be empty), or a bool
        mask [M] / [B, M] in `names` order.
      decode_rng: optional key for the discarded directions (see `flat_to_latents`).

    Returns:
      dict name -> [B, ...]: observed modalities reconstructed through their
      autoencoders, the others generated.
    """
    if isinstance(observed, (list, tuple, set)):
      unknown = set(observed) - set(self.names)
      if unknown:
        raise errors.DataError(f"unknown modalities {sorted(unknown)}; known: {self.names}")
      observed = np.array([n in observed for n in self.names])
    mask = np.asarray(observed, bool)
    if mask.shape[-1:] != (len(self.names),):
      raise errors.DataError(f"observed mask has shape {mask.shape}; expected [M] or [B, M] "
                             f"with M = {len(self.names)}")
    required = [n for i, n in enumerate(self.names) if mask[..., i].any()]
    self.check_batch(batch, required)
    size = len(next(batch[n] for n in self.names if n in batch))
    full = {m.name: batch[m.name] if m.name in batch else
            jnp.zeros((size,) + tuple(m.shape), jnp.float32) for m in self.modalities}
    flat = self._encode(full)  # checked above; the zero-filled rest needs no check
    latents = self.sampler(rng, self.prior_params, flat, jnp.asarray(mask),
                           min_observed=int(mask.sum(-1).min()))
    return self.decode(latents, decode_rng)


def build(config, run):
  """The trained MultimodalModel of `run` (a RunDir whose stages are finished).

  The config must be valid (`errors.validate_config`; the pipeline and `load`
  check it).
  """
  mods = registry.get(config.data).modalities(config.data)
  names = [m.name for m in mods]
  models, ae_params, stats = autoencoders.restore(config, run, mods)
  red = reduce.restore(run) if config.reduction.enabled else None
  dims = ([red.ranks[n] for n in names] if red is not None
          else [int(stats.mean[n].shape[0]) for n in names])
  sde, _, score_fn, params = prior.restore(config, run, dims)
  return MultimodalModel(mods, models, ae_params, stats, red, sde, score_fn, params,
                         config.sampling, prior.compiler_options(config.prior.model))


def load(workdir, config=None):
  """Rebuilds the trained `MultimodalModel` of a finished run.

  Args:
    workdir: the run folder.
    config: the run's config; by default the one the run saved
      (`RunDir.config`).

  Returns:
    MultimodalModel with the prior's EMA parameters.
  """
  run = rundir.RunDir(workdir)
  config = run.load_config() if config is None else config
  # e.g. sampling settings the prior was not trained for.
  errors.validate_config(config, stages.STAGES)
  return build(config, run)
