"""Stage `prior`: the joint score model over the concatenated (reduced) latents.

Denoising score matching under the configured SDE (`sbmae.diffusion.sde`), an
EMA of the parameters (used for sampling), optional random modality masking
(`config.prior.mask_prob`, see `sbmae.diffusion.losses`).
"""

import jax.numpy as jnp
import numpy as np

from sbmae import latents as latents_lib
from sbmae import stages
from sbmae import training
from sbmae.data import input_pipeline
from sbmae.diffusion import losses
from sbmae.diffusion import sde as sde_lib
from sbmae.models import score

STAGE = "prior"


def build(config, dims):
  """(sde, model, score_fn) for latent block sizes `dims`."""
  sde = sde_lib.get_sde(config.sde)
  model = score.get_model(config.prior, dims)
  return sde, model, score.get_score_fn(sde, model, config.prior.gaussian_base)


def init_params(model, rng, dim):
  """Parameters of a score network over a flat latent of `dim` coordinates."""
  x = jnp.zeros((1, dim), jnp.float32)
  return model.init(rng, x, jnp.ones((1,), jnp.float32), jnp.zeros_like(x))["params"]


def train(config, run, latents, names, writer):
  """Trains (or resumes / loads) the joint prior on `latents`.

  Args:
    config: full config.
    run: the `RunDir`.
    latents: dict name -> float [N, d_m] training latents (whitened, maybe reduced).
    names: modality order of the flat latent.
    writer: metrics Writer.

  Returns:
    (sde, model, score_fn, ema params, dims).
  """
  c = config.prior
  dims = tuple(int(latents[n].shape[-1]) for n in names)
  sde, model, score_fn, tx, state = _init(config, dims)
  flat = np.asarray(latents_lib.flatten(latents, names), np.float32)
  ds = input_pipeline.dataset({"z": flat}, training.per_process_batch(c.batch_size),
                        seed=stages.stage_seed(config, STAGE))
  dsm_loss = losses.get_dsm_loss_fn(sde, model, dims, mask_prob=c.mask_prob, eps=c.eps,
                                    gaussian_base=c.gaussian_base)
  loss_fn = lambda params, rng, batch: dsm_loss(params, rng, batch["z"])
  state = training.run(
      STAGE, state, training.make_train_step(loss_fn, tx, c.ema_decay), ds.__getitem__,
      num_steps=c.num_steps, rng=stages.stage_rng(config, STAGE),
      manager=training.checkpoint_manager(run.checkpoints(STAGE)), writer=writer,
      log_every=config.log_every, checkpoint_every=config.checkpoint_every)
  return sde, model, score_fn, state.ema_params, dims


def _init(config, dims):
  """(sde, model, score_fn, optimiser, freshly initialised TrainState with EMA)."""
  c = config.prior
  sde, model, score_fn = build(config, dims)
  tx = training.make_optimizer(c.learning_rate, c.num_steps, warmup_steps=c.warmup_steps,
                               grad_clip=c.grad_clip)
  params = init_params(model, stages.stage_rng(config, STAGE), sum(dims))
  return sde, model, score_fn, tx, training.TrainState.create(params, tx, ema=True)


def restore(config, run, dims):
  """(sde, model, score_fn, EMA params) of a finished prior stage of `run` (a RunDir)."""
  sde, model, score_fn, _, state = _init(config, dims)
  state = training.restore_stage(run.checkpoints(STAGE), STAGE, state)
  return sde, model, score_fn, state.ema_params
