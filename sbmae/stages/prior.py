"""Stage `prior`: the joint score model over the concatenated (reduced) latents.

Denoising score matching under the configured SDE (`sbmae.diffusion.sde`), an EMA of the
parameters (used for sampling), and conditioning tasks drawn per example: the
number of clean modalities from `config.prior.clean_count_dist` mixed with
`config.prior.uncond_share` unconditional examples, clean modalities made
absent with `config.prior.absent_prob` (see `sbmae.diffusion.losses`). Every
`config.prior.eval_every` steps the EMA parameters' denoising loss for each
number k of clean modalities is measured on fixed held-out (test) latents and
on as many training latents (`prior/eval/heldout_k{k}`, `prior/eval/train_k{k}`
in TensorBoard and `RunDir.prior_eval`): a held-out loss rising while
the training one falls is the prior overfitting.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sbmae import latents as latents_lib
from sbmae import stages
from sbmae import training
from sbmae.data import input_pipeline
from sbmae.diffusion import losses
from sbmae.diffusion import sde as sde_lib
from sbmae.models import conv
from sbmae.models import score

STAGE = "prior"


def build(config, dims):
  """(sde, model, score_fn) for latent block sizes `dims`."""
  sde = sde_lib.get_sde(config.sde)
  model = score.get_model(config.prior, dims)
  return sde, model, losses.get_score_fn(sde, model, config.prior.gaussian_base)


def compiler_options(model_name):
  """XLA options of the jitted functions of prior `model_name`: the conv nets' for "unet".

  `conv.compiler_options()` (YNNPACK dots on CPU) makes the U-Net's steps
  faster (width 64, D = 320, batch 256: train step 1.17 s -> 0.77 s, 100-step
  sampler 55.1 s -> 42.5 s) and the MLP's sampler slower (4.12 s -> 5.38 s),
  `bench/bench_prior.py`, 2026-12-01.
  """
  return conv.compiler_options() if model_name == "unet" else None


def init_params(model, rng, dim):
  """Parameters of a score network over a flat latent of `dim` coordinates."""
  x = jnp.zeros((1, dim), jnp.float32)
  return model.init(rng, x, jnp.ones((1,), jnp.float32), jnp.zeros_like(x))["params"]



def get_heldout_eval_fn(sde, model, dims, config, datasets, seed, compiler_options=None):
  """The per-k denoising loss of given parameters on fixed data.

  Args:
    sde, model, dims: as for `losses.get_per_example_loss_fn`.
    config: the prior config (eps, gaussian_base).
    datasets: dict name -> flat latents [n, D] (e.g. "heldout", "train").
    seed: fixes the subsets, times and noise, the same at every evaluation.
    compiler_options: XLA options of its compilation (`compiler_options`).

  Returns:
    eval_fn(params) -> dict "{name}_k{k}" -> float for k = 0..M-1 and
    "{name}" -> their mean: the DSM loss with exactly k random modalities clean.
  """
  m = len(dims)
  per_example = losses.get_per_example_loss_fn(sde, model, dims, eps=config.eps,
                                               gaussian_base=config.gaussian_base)
  datasets = {k: jnp.asarray(v, jnp.float32) for k, v in datasets.items()}

  @functools.partial(jax.jit, compiler_options=compiler_options)
  def per_k(params, data):
    def loss_k(k):  # lax.map: the network is compiled once, not M times.
      set_key, loss_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), k))
      clean = losses.random_subsets(set_key, jnp.full((data.shape[0],), k), m)
      return jnp.mean(per_example(params, loss_key, data, clean, jnp.zeros_like(clean)))
    return jax.lax.map(loss_k, jnp.arange(m))

  def eval_fn(params):
    metrics = {}
    for name, data in datasets.items():
      values = np.asarray(jax.device_get(per_k(params, data)))
      metrics.update({f"{name}_k{k}": float(v) for k, v in enumerate(values)})
      metrics[name] = float(values.mean())
    return metrics

  return eval_fn


def train(config, run, latents, names, writer, test_latents=None):
  """Trains (or resumes / loads) the joint prior on `latents`.

  Args:
    config: full config.
    run: the `RunDir`.
    latents: dict name -> float [N, d_m] training latents (whitened, maybe reduced).
    names: modality order of the flat latent.
    writer: metrics Writer.
    test_latents: optional held-out latents like `latents`; with
      `prior.eval_every` > 0 the per-k denoising loss is measured on the first
      `prior.eval_examples` of them (and of the training latents).

  Returns:
    (sde, model, score_fn, ema params, dims).
  """
  c = config.prior
  dims = tuple(int(latents[n].shape[-1]) for n in names)
  sde, model, score_fn, tx, state = _init(config, dims)
  flat = np.asarray(latents_lib.flatten(latents, names), np.float32)
  ds = input_pipeline.dataset({"z": flat}, training.per_process_batch(c.batch_size),
                              seed=stages.stage_seed(config, STAGE))
  probs = losses.clean_count_probs(c.clean_count_dist, c.uncond_share, len(dims))
  dsm_loss = losses.get_dsm_loss_fn(sde, model, dims, clean_count_probs=probs,
                                    absent_prob=c.absent_prob, eps=c.eps,
                                    gaussian_base=c.gaussian_base)
  loss_fn = lambda params, rng, batch: dsm_loss(params, rng, batch["z"])
  options = compiler_options(c.model)
  eval_fn = None
  if test_latents is not None and c.eval_every > 0:
    held_out = np.asarray(latents_lib.flatten(test_latents, names),
                          np.float32)[:c.eval_examples]
    losses_fn = get_heldout_eval_fn(sde, model, dims, c, {
        "heldout": held_out, "train": flat[:len(held_out)]},
                                    seed=stages.stage_seed(config, "prior_eval"),
                                    compiler_options=options)
    eval_fn = lambda state: losses_fn(state.ema_params)
  state = training.run(
      STAGE, state, training.make_train_step(loss_fn, tx, c.ema_decay, options),
      ds.__getitem__,
      num_steps=c.num_steps, rng=stages.stage_rng(config, STAGE),
      manager=training.checkpoint_manager(run.checkpoints(STAGE)), writer=writer,
      log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      eval_fn=eval_fn, eval_every=c.eval_every, eval_path=run.prior_eval)
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
